-- Flow runs, their steps and the triggers that start them: the PostgreSQL spelling of
-- migrations/sqlite/0001_initial.sql (timestamps as timestamptz, JSON as jsonb).
CREATE TABLE flow_runs (
    id               text PRIMARY KEY,
    flow             text NOT NULL,
    spec             jsonb NOT NULL,
    owner            text NOT NULL,
    owner_claims     jsonb NOT NULL DEFAULT '[]',
    event_id         text NOT NULL,
    inputs           jsonb NOT NULL,
    trigger_info     jsonb,
    trigger_id       text,
    state            text NOT NULL,
    reason           text,
    outputs          jsonb,
    idempotency_key  text,
    created_at       timestamptz NOT NULL,
    started_at       timestamptz,
    finished_at      timestamptz,
    updated_at       timestamptz NOT NULL
);
CREATE UNIQUE INDEX flow_runs_idempotency ON flow_runs(owner, idempotency_key);
CREATE INDEX flow_runs_owner ON flow_runs(owner, created_at);
CREATE INDEX flow_runs_state ON flow_runs(state, trigger_id, created_at);
CREATE TABLE flow_steps (
    run_id       text NOT NULL REFERENCES flow_runs(id),
    key          text NOT NULL,
    step         text NOT NULL,
    item_index   integer,
    item         jsonb,
    state        text NOT NULL,
    attempt      integer NOT NULL DEFAULT 0,
    entry_id     text,
    result       jsonb,
    error        text,
    started_at   timestamptz,
    finished_at  timestamptz,
    PRIMARY KEY (run_id, key)
);
CREATE TABLE flow_triggers (
    id              text PRIMARY KEY,
    owner           text NOT NULL,
    owner_claims    jsonb NOT NULL DEFAULT '[]',
    flow            text NOT NULL,
    spec            jsonb NOT NULL,
    kind            text NOT NULL,
    config          jsonb NOT NULL,
    event_id        text NOT NULL,
    inputs          jsonb NOT NULL,
    max_concurrent  integer NOT NULL,
    secret          text,
    active          integer NOT NULL DEFAULT 1,
    created_at      timestamptz NOT NULL,
    cursor          jsonb
);
CREATE INDEX flow_triggers_owner ON flow_triggers(owner, created_at);
