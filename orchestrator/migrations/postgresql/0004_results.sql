-- The results catalogue, PostgreSQL spelling of migrations/sqlite/0004_results.sql: one row per
-- finished entry with its parameters, result, artifacts and provenance (orchestrator.results).
CREATE TABLE results (
    entry_id         text PRIMARY KEY REFERENCES entries(id),
    event_id         text NOT NULL REFERENCES events(id),
    service          text NOT NULL,
    version          text NOT NULL,
    state            text NOT NULL,
    site             text NOT NULL,
    submitted_by     text NOT NULL,
    account          text,
    campaign_id      text,
    evaluation       integer,
    template_sha256  text,
    created_at       timestamptz NOT NULL,
    started_at       timestamptz,
    finished_at      timestamptz NOT NULL,
    parameters       jsonb NOT NULL,
    result           jsonb,
    artifacts        jsonb NOT NULL DEFAULT '[]'
);
CREATE INDEX results_event_finished ON results(event_id, finished_at, entry_id);
CREATE INDEX results_finished ON results(finished_at, entry_id);
CREATE INDEX results_service_finished ON results(service, finished_at, entry_id);
CREATE INDEX results_campaign ON results(campaign_id, evaluation) WHERE campaign_id IS NOT NULL;

INSERT INTO results (entry_id, event_id, service, version, state, site, submitted_by,
                     created_at, started_at, finished_at, parameters, result)
SELECT id, event_id, service, version, state, site, submitted_by, created_at, started_at,
       COALESCE(finished_at, updated_at), parameters, result
FROM entries WHERE state IN ('succeeded', 'failed', 'cancelled', 'expired');
