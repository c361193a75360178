-- Sweeps (orchestrator.sweeps): one template over many parameter sets, one entry per element.
-- Events may carry a Slurm reservation for their entries and a webhook for their warnings.
CREATE TABLE sweeps (
    id               text PRIMARY KEY,
    event_id         text NOT NULL REFERENCES events(id),
    submitted_by     text NOT NULL,
    service          text NOT NULL,
    site             text NOT NULL,
    size             integer NOT NULL,
    throttle         integer,
    created_at       timestamptz NOT NULL,
    idempotency_key  text,
    request_hash     text
);
CREATE UNIQUE INDEX sweeps_idempotency ON sweeps(submitted_by, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX sweeps_event ON sweeps(event_id);

CREATE TABLE sweep_elements (
    sweep_id  text NOT NULL REFERENCES sweeps(id),
    idx       integer NOT NULL,
    entry_id  text NOT NULL REFERENCES entries(id),
    PRIMARY KEY (sweep_id, idx)
);

ALTER TABLE events ADD COLUMN reservation text;
ALTER TABLE events ADD COLUMN webhook_url text;
ALTER TABLE events ADD COLUMN webhook_secret text;
