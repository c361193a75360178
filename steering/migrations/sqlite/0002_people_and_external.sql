-- People in the loop and external measurements: a campaign can be paused; an evaluation asked
-- over MCP carries a lease (back to the pool when it passes), the key of the ask that chose it
-- and the key of the tell that recorded it; every person's action is kept in campaign_actions.
ALTER TABLE campaigns ADD COLUMN paused INTEGER NOT NULL DEFAULT 0;
ALTER TABLE evaluations ADD COLUMN lease_until TEXT;
ALTER TABLE evaluations ADD COLUMN ask_key TEXT;
ALTER TABLE evaluations ADD COLUMN tell_key TEXT;
CREATE UNIQUE INDEX evaluations_tell_key ON evaluations(campaign_id, tell_key);
CREATE INDEX evaluations_ask_key ON evaluations(campaign_id, ask_key);
CREATE TABLE campaign_actions (
    id           TEXT PRIMARY KEY,
    campaign_id  TEXT NOT NULL REFERENCES campaigns(id),
    at           TEXT NOT NULL,
    principal    TEXT NOT NULL,
    action       TEXT NOT NULL,
    arguments    TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX campaign_actions_campaign ON campaign_actions(campaign_id, at);
