-- The owner's token claims (JSON [[name, value], ...]): a campaign's jobs run as the account a
-- site maps its owner to, also where the site maps by a claim (ground.accounts).
ALTER TABLE campaigns ADD COLUMN owner_claims TEXT NOT NULL DEFAULT '[]';
