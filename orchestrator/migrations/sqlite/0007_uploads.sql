-- Uploads (orchestrator.storage.uploads): an input sent over HTTP in ranges. Its state is here,
-- its bytes in the storage layer (one object a PUT, `parts` lists them), so any replica
-- takes the next range.
CREATE TABLE uploads (
    id          TEXT PRIMARY KEY,
    principal   TEXT NOT NULL,
    name        TEXT NOT NULL,
    size        INTEGER NOT NULL,
    received    INTEGER NOT NULL DEFAULT 0,
    parts       TEXT NOT NULL DEFAULT '[]',
    complete    INTEGER NOT NULL DEFAULT 0,
    sha256      TEXT,
    created_at  TEXT NOT NULL
);
