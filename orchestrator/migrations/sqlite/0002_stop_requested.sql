-- Why an entry is being stopped (cancel, event stop, event expiry), kept in the store so that a
-- server that restarts mid-stop still records the intended final state, not a signal death.
ALTER TABLE entries ADD COLUMN stop_requested TEXT;
