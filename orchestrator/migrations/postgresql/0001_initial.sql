-- sciorch schema v1, PostgreSQL spelling of migrations/sqlite/0001_initial.sql: the same tables
-- and columns, with timestamps as timestamptz and JSON as jsonb. The version applied is kept in
-- schema_version (see orchestrator.database).
CREATE TABLE events (
    id          text PRIMARY KEY,
    name        text NOT NULL,
    owner       text NOT NULL,
    site        text,
    state       text NOT NULL,
    created_at  timestamptz NOT NULL,
    expires_at  timestamptz,
    stopped_at  timestamptz,
    is_default  integer NOT NULL DEFAULT 0
);
CREATE INDEX events_owner ON events(owner);
CREATE UNIQUE INDEX events_one_default ON events(owner) WHERE is_default = 1 AND state = 'active';

CREATE TABLE shares (
    event_id   text NOT NULL REFERENCES events(id),
    principal  text NOT NULL,
    role       text NOT NULL,
    PRIMARY KEY (event_id, principal)
);
CREATE INDEX shares_principal ON shares(principal);

CREATE TABLE entries (
    id               text PRIMARY KEY,
    event_id         text NOT NULL REFERENCES events(id),
    service          text NOT NULL,
    version          text NOT NULL,
    kind             text NOT NULL,
    site             text NOT NULL,
    submitted_by     text NOT NULL,
    state            text NOT NULL,
    reason           text,
    parameters       jsonb NOT NULL,
    resources        jsonb NOT NULL,
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL,
    started_at       timestamptz,
    finished_at      timestamptz,
    exit_code        integer,
    url              text,
    endpoint         text,
    handle           jsonb NOT NULL DEFAULT '{}',
    idempotency_key  text,
    request_hash     text,
    restarts         integer NOT NULL DEFAULT 0,
    result           jsonb,
    spec             jsonb NOT NULL
);
CREATE INDEX entries_event ON entries(event_id, created_at);
CREATE INDEX entries_state ON entries(state);
CREATE UNIQUE INDEX entries_idempotency ON entries(submitted_by, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

CREATE TABLE transitions (
    seq       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    entry_id  text NOT NULL REFERENCES entries(id),
    state     text NOT NULL,
    at        timestamptz NOT NULL,
    reason    text
);
CREATE INDEX transitions_entry ON transitions(entry_id, seq);
