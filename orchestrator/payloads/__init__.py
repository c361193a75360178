"""Small payloads that the bundled service templates run: a simulated instrument (a job) and a
tiny HTTP app (a service). Kept free of heavy imports so they start fast."""
