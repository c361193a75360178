-- Campaigns and their evaluations, PostgreSQL spelling of migrations/sqlite/0001_initial.sql
-- (timestamps as timestamptz, JSON as jsonb), in the steering store's own schema.
CREATE TABLE campaigns (
    id              text PRIMARY KEY,
    name            text NOT NULL,
    owner           text NOT NULL,
    admin           integer NOT NULL DEFAULT 0,
    spec            jsonb NOT NULL,
    seed            bigint NOT NULL,
    state           text NOT NULL,
    reason          text,
    endpoint        text NOT NULL DEFAULT 'embedded',
    event_id        text,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    finished_at     timestamptz,
    stop_requested  integer NOT NULL DEFAULT 0,
    gp_state        jsonb NOT NULL DEFAULT '{}',
    posterior       jsonb,
    plots           jsonb NOT NULL DEFAULT '[]'
);
CREATE INDEX campaigns_owner ON campaigns(owner, created_at);
CREATE INDEX campaigns_state ON campaigns(state);
CREATE TABLE evaluations (
    campaign_id      text NOT NULL REFERENCES campaigns(id),
    seq              integer NOT NULL,
    point            jsonb NOT NULL,
    source           text NOT NULL,
    state            text NOT NULL,
    attempt          integer NOT NULL DEFAULT 1,
    idempotency_key  text NOT NULL,
    entry_id         text,
    attempts         jsonb NOT NULL DEFAULT '[]',
    value            double precision,
    noise            double precision,
    result           jsonb,
    reason           text,
    decision_s       double precision,
    asked_at         timestamptz NOT NULL,
    submitted_at     timestamptz,
    finished_at      timestamptz,
    PRIMARY KEY (campaign_id, seq)
);
CREATE UNIQUE INDEX evaluations_key ON evaluations(idempotency_key);
