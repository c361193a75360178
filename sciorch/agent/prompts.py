"""Playbooks (the server's MCP prompts) matched to the goal, and the system prompt."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import mcp.types as mcp_types
from fastmcp import Client

from sciorch.agent.models import AgentConfig, AgentError
from sciorch.agent.tools import McpTool

# When the goal reads like one of these playbooks (and the server offers it), it is rendered and
# put before the goal. Words are matched on the lower-cased goal.
PROMPT_HINTS: dict[str, tuple[tuple[str, ...], ...]] = {
    # every group must have a hit
    "diagnose_entry": (
        ("ent-",),
        ("why", "fail", "diagnos", "stuck", "pending", "expired", "crash", "broke", "error"),
    ),
    "run_gpu_service": (
        ("notebook", "gpu", "jupyter", "web app", "webapp", "dashboard"),
        ("launch", "start", "open", "run", "link", "give me", "spin up"),
    ),
    "steer_experiment": (
        ("maximi", "minimi", "optimi", "best setting", "find the setting", "closed-loop", "steer"),
    ),
}
ENTRY_ID_RE = re.compile(r"\bent-[0-9a-zA-Z]+\b")
BUDGET_RE = re.compile(
    r"\b(\d+)\s+(?:measurements?|points?|runs?|evaluations?|experiments?|jobs?|samples?|shots?)\b"
)
GPUS_RE = re.compile(r"\b(\d+)\s*(?:x\s*)?gpus?\b")
GPU_TYPE_RE = re.compile(r"\b(a100|h100|h200|gh200|v100|a40|l40s?|mi250x?|mi300x?)\b")


def prompt_arguments(prompt: mcp_types.Prompt, goal: str) -> dict[str, str]:
    """Values for a prompt's arguments read from the goal; what is not found is left out."""
    lowered = goal.lower()
    found: dict[str, str] = {}
    for arg in prompt.arguments or []:
        value: str | None = None
        if arg.name == "goal":
            value = goal
        elif arg.name == "entry_id":
            match = ENTRY_ID_RE.search(goal)
            value = match.group(0) if match else None
        elif arg.name == "budget":
            match = BUDGET_RE.search(lowered)
            value = match.group(1) if match else None
        elif arg.name == "gpus":
            match = GPUS_RE.search(lowered)
            value = match.group(1) if match else None
        elif arg.name == "gpu_type":
            match = GPU_TYPE_RE.search(lowered)
            value = match.group(1) if match else None
        if value is not None:
            found[arg.name] = value
    return found


def missing_arguments(prompt: mcp_types.Prompt, values: dict[str, str]) -> list[str]:
    return [a.name for a in prompt.arguments or [] if a.required and a.name not in values]


def choose_prompt(
    goal: str, prompts: Sequence[mcp_types.Prompt], wanted: str | None
) -> tuple[mcp_types.Prompt, dict[str, str]] | None:
    """The playbook for this goal: `wanted` (an error if unknown or its required arguments are
    not in the goal), else the first hinted prompt the goal matches and can fill."""
    by_name = {p.name: p for p in prompts}
    if wanted:
        prompt = by_name.get(wanted)
        if prompt is None:
            known = ", ".join(sorted(by_name)) or "none"
            raise AgentError(f"unknown prompt {wanted!r}; the server offers: {known}")
        values = prompt_arguments(prompt, goal)
        missing = missing_arguments(prompt, values)
        if missing:
            raise AgentError(
                f"prompt {wanted!r} needs {', '.join(missing)}, which the goal does not name "
                "(e.g. put the entry id in the goal)"
            )
        return prompt, values
    lowered = goal.lower()
    for name, groups in PROMPT_HINTS.items():
        prompt = by_name.get(name)
        if prompt is None:
            continue
        if not all(any(word in lowered for word in group) for group in groups):
            continue
        values = prompt_arguments(prompt, goal)
        if not missing_arguments(prompt, values):
            return prompt, values
    return None


async def render_prompt(client: Client[Any], name: str, arguments: dict[str, str]) -> str:
    result = await client.get_prompt(name, arguments)
    parts = []
    for message in result.messages:
        text = getattr(message.content, "text", None)
        if isinstance(text, str):
            parts.append(text.strip())
    return "\n\n".join(parts)


async def list_prompts(client: Client[Any]) -> list[mcp_types.Prompt]:
    """The server's prompts; none when it offers no prompts capability."""
    try:
        return await client.list_prompts()
    except Exception:  # a server without prompts answers with a JSON-RPC error
        return []



SYSTEM = """\
You are the sciorch operations agent. sciorch runs jobs and long-running services on scientific \
facilities; you act for the user only through the sciorch tools offered to you.

How to work:
- Discover before acting: read the catalogue (list_services) and the sites (list_sites) before \
you submit or launch, and use the parameter names and bounds the schemas give.
- Follow work to its end: after submit_job or launch_service, call wait_entry until the entry is \
finished (jobs) or ready (services); call it again when it returns timed_out=true.
- When a tool returns an error, read it: it names the failing field and what was expected. Fix \
the call and try again, or explain why you cannot. Do not repeat a failing call unchanged.
- Never invent ids, URLs or numbers: quote them from tool results.
- Tools that cancel or stop work need the user's confirmation. If the user declines, do not \
retry that call; carry on without it or explain what you would have done.
- Finish with a short answer for the user: what you did, what came out, and the evidence: entry \
ids, event ids, URLs (access_url) and the key results. Say plainly if the goal was not met."""

READ_ONLY_NOTE = """\
This run is READ-ONLY: only tools that change nothing are offered. Calls to any other tool are \
refused. If the goal needs changes, say which calls you would make."""

DRY_RUN_NOTE = """\
This is a DRY RUN: do not act. You may call the discovery tools offered to you to check what \
exists. Then answer with a plan: a numbered list of the tool calls you would make, in order, \
with their arguments, what you expect from each and how you would check the outcome. The tools \
you could use in a real run:"""


def build_system(
    config: AgentConfig,
    instructions: str | None,
    prompts: Sequence[mcp_types.Prompt],
    all_tools: Sequence[McpTool],
) -> str:
    parts = [SYSTEM]
    if instructions:
        parts.append("The sciorch server says:\n" + instructions.strip())
    if prompts:
        lines = [
            f"- {p.name}: {(p.description or '').strip()}"
            for p in sorted(prompts, key=lambda p: p.name)
        ]
        parts.append(
            "Playbooks (MCP prompts) you can fetch with the get_playbook tool when the goal "
            "matches one:\n" + "\n".join(lines)
        )
    if config.dry_run:
        lines = []
        for tool in all_tools:
            first = tool.description.split("\n")[0]
            if len(first) > 200:
                first = first[:200].rstrip() + "..."
            lines.append(f"- {tool.name}: {first}")
        parts.append(DRY_RUN_NOTE + "\n" + "\n".join(lines))
    elif config.read_only:
        parts.append(READ_ONLY_NOTE)
    if config.system:
        parts.append(config.system.strip())
    return "\n\n".join(parts)


def first_message(
    goal: str, playbook: str | None, playbook_name: str | None, config: AgentConfig
) -> str:
    parts = []
    if playbook:
        parts.append(f"Playbook ({playbook_name}):\n{playbook}")
    parts.append(f"Goal: {goal.strip()}")
    if config.dry_run:
        parts.append("Dry run: answer with the plan only.")
    return "\n\n".join(parts)
