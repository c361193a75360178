"""Typed operations (pydantic in, pydantic out) over the engine. No MCP, no backends."""

from tools.operations import (
    cancel_entry,
    create_event,
    get_entry,
    launch_service,
    list_entries,
    list_events,
    list_services,
    list_sites,
    read_artifact,
    read_logs,
    read_results,
    share_event,
    stop_event,
    submit_job,
    upload_input,
    wait_entry,
)

__all__ = [
    "cancel_entry",
    "create_event",
    "get_entry",
    "launch_service",
    "list_entries",
    "list_events",
    "list_services",
    "list_sites",
    "read_artifact",
    "read_logs",
    "read_results",
    "share_event",
    "stop_event",
    "submit_job",
    "upload_input",
    "wait_entry",
]
