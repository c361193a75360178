-- Sweeps (orchestrator.sweeps): one template over many parameter sets, one entry per element.
-- Events may carry a Slurm reservation for their entries and a webhook for their warnings.
CREATE TABLE sweeps (
    id               TEXT PRIMARY KEY,
    event_id         TEXT NOT NULL REFERENCES events(id),
    submitted_by     TEXT NOT NULL,
    service          TEXT NOT NULL,
    site             TEXT NOT NULL,
    size             INTEGER NOT NULL,
    throttle         INTEGER,
    created_at       TEXT NOT NULL,
    idempotency_key  TEXT,
    request_hash     TEXT
);
CREATE UNIQUE INDEX sweeps_idempotency ON sweeps(submitted_by, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX sweeps_event ON sweeps(event_id);

CREATE TABLE sweep_elements (
    sweep_id  TEXT NOT NULL REFERENCES sweeps(id),
    idx       INTEGER NOT NULL,
    entry_id  TEXT NOT NULL REFERENCES entries(id),
    PRIMARY KEY (sweep_id, idx)
);

ALTER TABLE events ADD COLUMN reservation TEXT;
ALTER TABLE events ADD COLUMN webhook_url TEXT;
ALTER TABLE events ADD COLUMN webhook_secret TEXT;
