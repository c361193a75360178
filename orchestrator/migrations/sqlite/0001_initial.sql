-- sciorch schema v1. Each migration file runs once, in order; PRAGMA user_version records the last
-- (migrations/postgresql/ holds the same numbers in PostgreSQL's spelling).
CREATE TABLE events (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    owner       TEXT NOT NULL,
    site        TEXT,
    state       TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    expires_at  TEXT,
    stopped_at  TEXT,
    is_default  INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX events_owner ON events(owner);
CREATE UNIQUE INDEX events_one_default ON events(owner) WHERE is_default = 1 AND state = 'active';

CREATE TABLE shares (
    event_id   TEXT NOT NULL REFERENCES events(id),
    principal  TEXT NOT NULL,
    role       TEXT NOT NULL,
    PRIMARY KEY (event_id, principal)
);
CREATE INDEX shares_principal ON shares(principal);

CREATE TABLE entries (
    id               TEXT PRIMARY KEY,
    event_id         TEXT NOT NULL REFERENCES events(id),
    service          TEXT NOT NULL,
    version          TEXT NOT NULL,
    kind             TEXT NOT NULL,
    site             TEXT NOT NULL,
    submitted_by     TEXT NOT NULL,
    state            TEXT NOT NULL,
    reason           TEXT,
    parameters       TEXT NOT NULL,
    resources        TEXT NOT NULL,
    created_at       TEXT NOT NULL,
    updated_at       TEXT NOT NULL,
    started_at       TEXT,
    finished_at      TEXT,
    exit_code        INTEGER,
    url              TEXT,
    endpoint         TEXT,
    handle           TEXT NOT NULL DEFAULT '{}',
    idempotency_key  TEXT,
    request_hash     TEXT,
    restarts         INTEGER NOT NULL DEFAULT 0,
    result           TEXT,
    spec             TEXT NOT NULL
);
CREATE INDEX entries_event ON entries(event_id, created_at);
CREATE INDEX entries_state ON entries(state);
CREATE UNIQUE INDEX entries_idempotency ON entries(submitted_by, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

CREATE TABLE transitions (
    seq       INTEGER PRIMARY KEY AUTOINCREMENT,
    entry_id  TEXT NOT NULL REFERENCES entries(id),
    state     TEXT NOT NULL,
    at        TEXT NOT NULL,
    reason    TEXT
);
CREATE INDEX transitions_entry ON transitions(entry_id, seq);
