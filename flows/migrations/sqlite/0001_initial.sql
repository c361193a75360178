-- Flow runs, their steps and the triggers that start them (flows.db). migrations/postgresql/
-- holds the same numbers in PostgreSQL's spelling.
CREATE TABLE flow_runs (
    id               TEXT PRIMARY KEY,
    flow             TEXT NOT NULL,
    spec             TEXT NOT NULL,
    owner            TEXT NOT NULL,
    owner_claims     TEXT NOT NULL DEFAULT '[]',
    event_id         TEXT NOT NULL,
    inputs           TEXT NOT NULL,
    trigger_info     TEXT,
    trigger_id       TEXT,
    state            TEXT NOT NULL,
    reason           TEXT,
    outputs          TEXT,
    idempotency_key  TEXT,
    created_at       TEXT NOT NULL,
    started_at       TEXT,
    finished_at      TEXT,
    updated_at       TEXT NOT NULL
);
CREATE UNIQUE INDEX flow_runs_idempotency ON flow_runs(owner, idempotency_key);
CREATE INDEX flow_runs_owner ON flow_runs(owner, created_at);
CREATE INDEX flow_runs_state ON flow_runs(state, trigger_id, created_at);
CREATE TABLE flow_steps (
    run_id       TEXT NOT NULL REFERENCES flow_runs(id),
    key          TEXT NOT NULL,
    step         TEXT NOT NULL,
    item_index   INTEGER,
    item         TEXT,
    state        TEXT NOT NULL,
    attempt      INTEGER NOT NULL DEFAULT 0,
    entry_id     TEXT,
    result       TEXT,
    error        TEXT,
    started_at   TEXT,
    finished_at  TEXT,
    PRIMARY KEY (run_id, key)
);
CREATE TABLE flow_triggers (
    id              TEXT PRIMARY KEY,
    owner           TEXT NOT NULL,
    owner_claims    TEXT NOT NULL DEFAULT '[]',
    flow            TEXT NOT NULL,
    spec            TEXT NOT NULL,
    kind            TEXT NOT NULL,
    config          TEXT NOT NULL,
    event_id        TEXT NOT NULL,
    inputs          TEXT NOT NULL,
    max_concurrent  INTEGER NOT NULL,
    secret          TEXT,
    active          INTEGER NOT NULL DEFAULT 1,
    created_at      TEXT NOT NULL,
    cursor          TEXT
);
CREATE INDEX flow_triggers_owner ON flow_triggers(owner, created_at);
