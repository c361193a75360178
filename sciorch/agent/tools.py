"""The MCP tools offered to Claude: which ones (read-only, dry run), their descriptions, and the
evidence (entry ids, URLs) collected from their results."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import mcp.types as mcp_types
from pydantic import BaseModel

from sciorch.agent.models import DISCOVERY_PREFIXES, TOOL_NAME, AgentConfig, Evidence


class McpTool(BaseModel):
    """One MCP tool as the agent sees it."""

    name: str
    api_name: str  # the name Claude sees (MCP names may hold characters the API refuses)
    description: str
    input_schema: dict[str, Any]
    read_only: bool
    destructive: bool


def describe_tools(tools: Sequence[mcp_types.Tool]) -> list[McpTool]:
    """MCP tools with their hints. Per the MCP specification an unannotated tool is neither
    read-only nor safe: destructiveHint defaults to true for tools that are not read-only."""
    out: list[McpTool] = []
    taken: set[str] = set()
    for tool in tools:
        ann = tool.annotations
        read_only = bool(ann and ann.read_only_hint)
        destructive = not read_only and (
            ann is None or ann.destructive_hint is None or bool(ann.destructive_hint)
        )
        api_name = tool.name if TOOL_NAME.match(tool.name) else _api_name(tool.name)
        while api_name in taken:
            api_name = f"{api_name[:120]}_{len(taken)}"
        taken.add(api_name)
        schema = dict(tool.input_schema or {})
        schema.setdefault("type", "object")
        out.append(
            McpTool(
                name=tool.name,
                api_name=api_name,
                description=(tool.description or tool.title or tool.name).strip(),
                input_schema=schema,
                read_only=read_only,
                destructive=destructive,
            )
        )
    return out


def _api_name(name: str) -> str:
    return (re.sub(r"[^a-zA-Z0-9_-]", "_", name) or "tool")[:128]


def select_tools(
    tools: Sequence[McpTool], config: AgentConfig
) -> tuple[list[McpTool], dict[str, str]]:
    """(offered, withheld name -> why) for the run's mode."""
    offered: list[McpTool] = []
    withheld: dict[str, str] = {}
    for tool in tools:
        if config.dry_run and not (tool.read_only and tool.name.startswith(DISCOVERY_PREFIXES)):
            withheld[tool.name] = "dry run: only read-only discovery tools"
        elif config.read_only and not tool.read_only:
            withheld[tool.name] = "read-only run: the tool may change state"
        else:
            offered.append(tool)
    return offered, withheld


def result_text(result: Any) -> str:
    """The text content of an MCP tool result, images and other blocks as placeholders."""
    parts = []
    for block in getattr(result, "content", None) or []:
        text = getattr(block, "text", None)
        parts.append(text if isinstance(text, str) else f"[{getattr(block, 'type', 'content')}]")
    return "\n".join(parts)


def collect_evidence(value: Any, evidence: Evidence) -> None:
    """Entry and event ids and access links anywhere in a tool result."""

    def add(items: list[str], item: str) -> None:
        if item not in items:
            items.append(item)

    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, str):
                if key in ("id", "entry_id") and item.startswith("ent-"):
                    add(evidence.entry_ids, item)
                elif key in ("id", "event_id") and item.startswith("evt-"):
                    add(evidence.event_ids, item)
                elif key == "access_url" and item.startswith(("http://", "https://")):
                    add(evidence.urls, item)
                elif (
                    key == "url"
                    and item.startswith(("http://", "https://"))
                    and not value.get("access_url")
                ):
                    add(evidence.urls, item)
            else:
                collect_evidence(item, evidence)
    elif isinstance(value, list):
        for item in value:
            collect_evidence(item, evidence)
