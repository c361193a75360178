-- Campaigns and their evaluations (steering.db). migrations/postgresql/ holds the same numbers in
-- PostgreSQL's spelling.
CREATE TABLE campaigns (
    id              TEXT PRIMARY KEY,
    name            TEXT NOT NULL,
    owner           TEXT NOT NULL,
    admin           INTEGER NOT NULL DEFAULT 0,
    spec            TEXT NOT NULL,
    seed            INTEGER NOT NULL,
    state           TEXT NOT NULL,
    reason          TEXT,
    endpoint        TEXT NOT NULL DEFAULT 'embedded',
    event_id        TEXT,
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL,
    finished_at     TEXT,
    stop_requested  INTEGER NOT NULL DEFAULT 0,
    gp_state        TEXT NOT NULL DEFAULT '{}',
    posterior       TEXT,
    plots           TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX campaigns_owner ON campaigns(owner, created_at);
CREATE INDEX campaigns_state ON campaigns(state);
CREATE TABLE evaluations (
    campaign_id      TEXT NOT NULL REFERENCES campaigns(id),
    seq              INTEGER NOT NULL,
    point            TEXT NOT NULL,
    source           TEXT NOT NULL,
    state            TEXT NOT NULL,
    attempt          INTEGER NOT NULL DEFAULT 1,
    idempotency_key  TEXT NOT NULL,
    entry_id         TEXT,
    attempts         TEXT NOT NULL DEFAULT '[]',
    value            REAL,
    noise            REAL,
    result           TEXT,
    reason           TEXT,
    decision_s       REAL,
    asked_at         TEXT NOT NULL,
    submitted_at     TEXT,
    finished_at      TEXT,
    PRIMARY KEY (campaign_id, seq)
);
CREATE UNIQUE INDEX evaluations_key ON evaluations(idempotency_key);
