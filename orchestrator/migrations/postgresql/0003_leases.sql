-- Leases: one owner per piece of background work (a site's entries, event expiry, a campaign)
-- among the server replicas that share a store, held until `deadline` and renewed before it
-- (see orchestrator.leases). A lease past its deadline may be taken by any replica.
CREATE TABLE leases (
    name      text PRIMARY KEY,
    owner     text NOT NULL,
    deadline  timestamptz NOT NULL
);
