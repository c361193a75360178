"""Flows: event-triggered multi-step pipelines (spec, placeholders, runner, triggers, store)."""
