-- Deadline warnings already sent (orchestrator.deadlines): one row per entry or event, kind and
-- deadline, written before the warning goes out, so that a replica taking the warnings lease
-- over never sends one again.
CREATE TABLE warnings_sent (
    subject   text NOT NULL,
    kind      text NOT NULL,
    deadline  text NOT NULL,
    sent_at   timestamptz NOT NULL,
    sent_by   text,
    PRIMARY KEY (subject, kind, deadline)
);
