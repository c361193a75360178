-- The owner's token claims, PostgreSQL spelling of migrations/sqlite/0003_owner_claims.sql.
ALTER TABLE campaigns ADD COLUMN owner_claims jsonb NOT NULL DEFAULT '[]';
