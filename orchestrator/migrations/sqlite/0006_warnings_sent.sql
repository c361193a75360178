-- Deadline warnings already sent (orchestrator.deadlines): one row per entry or event, kind and
-- deadline, written before the warning goes out, so that a replica taking the warnings lease
-- over never sends one again.
CREATE TABLE warnings_sent (
    subject   TEXT NOT NULL,
    kind      TEXT NOT NULL,
    deadline  TEXT NOT NULL,
    sent_at   TEXT NOT NULL,
    sent_by   TEXT,
    PRIMARY KEY (subject, kind, deadline)
);
