-- The results catalogue: one row per finished entry with its parameters, result, artifacts and
-- provenance, searched by orchestrator.results (search_results). Written when an entry reaches
-- a final state; entries that finished before this migration are copied in here (without the
-- artifacts, campaign and template checksum, which only the engine knows).
CREATE TABLE results (
    entry_id         TEXT PRIMARY KEY REFERENCES entries(id),
    event_id         TEXT NOT NULL REFERENCES events(id),
    service          TEXT NOT NULL,
    version          TEXT NOT NULL,
    state            TEXT NOT NULL,
    site             TEXT NOT NULL,
    submitted_by     TEXT NOT NULL,
    account          TEXT,
    campaign_id      TEXT,
    evaluation       INTEGER,
    template_sha256  TEXT,
    created_at       TEXT NOT NULL,
    started_at       TEXT,
    finished_at      TEXT NOT NULL,
    parameters       TEXT NOT NULL,
    result           TEXT,
    artifacts        TEXT NOT NULL DEFAULT '[]'
);
-- The default order (newest first) within the caller's events, and the usual filters.
CREATE INDEX results_event_finished ON results(event_id, finished_at, entry_id);
CREATE INDEX results_finished ON results(finished_at, entry_id);
CREATE INDEX results_service_finished ON results(service, finished_at, entry_id);
CREATE INDEX results_campaign ON results(campaign_id, evaluation) WHERE campaign_id IS NOT NULL;

INSERT INTO results (entry_id, event_id, service, version, state, site, submitted_by,
                     created_at, started_at, finished_at, parameters, result)
SELECT id, event_id, service, version, state, site, submitted_by, created_at, started_at,
       COALESCE(finished_at, updated_at), parameters, result
FROM entries WHERE state IN ('succeeded', 'failed', 'cancelled', 'expired');
