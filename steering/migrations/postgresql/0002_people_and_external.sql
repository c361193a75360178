-- PostgreSQL spelling of migrations/sqlite/0002_people_and_external.sql.
ALTER TABLE campaigns ADD COLUMN paused integer NOT NULL DEFAULT 0;
ALTER TABLE evaluations ADD COLUMN lease_until timestamptz;
ALTER TABLE evaluations ADD COLUMN ask_key text;
ALTER TABLE evaluations ADD COLUMN tell_key text;
CREATE UNIQUE INDEX evaluations_tell_key ON evaluations(campaign_id, tell_key);
CREATE INDEX evaluations_ask_key ON evaluations(campaign_id, ask_key);
CREATE TABLE campaign_actions (
    id           text PRIMARY KEY,
    campaign_id  text NOT NULL REFERENCES campaigns(id),
    at           timestamptz NOT NULL,
    principal    text NOT NULL,
    action       text NOT NULL,
    arguments    jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX campaign_actions_campaign ON campaign_actions(campaign_id, at);
