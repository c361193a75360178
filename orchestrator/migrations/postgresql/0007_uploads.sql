-- Uploads (orchestrator.storage.uploads): an input sent over HTTP in ranges. Its state is here,
-- its bytes in the storage layer (one object a PUT, `parts` lists them), so any replica
-- takes the next range.
CREATE TABLE uploads (
    id          text PRIMARY KEY,
    principal   text NOT NULL,
    name        text NOT NULL,
    size        bigint NOT NULL,
    received    bigint NOT NULL DEFAULT 0,
    parts       text NOT NULL DEFAULT '[]',
    complete    integer NOT NULL DEFAULT 0,
    sha256      text,
    created_at  timestamptz NOT NULL
);
