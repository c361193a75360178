"""The agent's data: its configuration and budgets, token usage and cost, the records of each
turn and tool call, the evidence gathered and the JSON transcript."""

from __future__ import annotations

import os
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from anthropic.types.beta import BetaUsage
from pydantic import BaseModel, ConfigDict, Field

DEFAULT_MODEL = "claude-sonnet-5-5"
MODEL_ENV = "SCIORCH_AGENT_MODEL"

# USD per million tokens (input, output): Anthropic's list prices for each model family when this
# was written (Opus 4.5 and later 5/25, Sonnet 3/15, Haiku 4.5 and later 1/5). A model is priced
# by the family named in its id; an id naming no known family (or a family priced differently
# later) uses UNKNOWN_MODEL_PRICE, the highest Claude list price, so that the cost cap errs on
# the side of stopping early. Cache writes cost 1.25x input, cache reads 0.1x input. Pass
# AgentConfig.price_per_mtok for exact figures.
PRICES_PER_MTOK: dict[str, tuple[float, float]] = {
    "opus": (5.0, 25.0),
    "sonnet": (3.0, 15.0),
    "haiku": (1.0, 5.0),
}
UNKNOWN_MODEL_PRICE = (15.0, 75.0)
CACHE_WRITE_FACTOR = 1.25
CACHE_READ_FACTOR = 0.1

# The tools dry-run offers: read-only ones whose name starts with one of these (list_services,
# list_sites, list_events, ...): enough to plan against the catalogue and the sites.
DISCOVERY_PREFIXES = ("list_",)
PLAYBOOK_TOOL = "get_playbook"
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")

StoppedReason = Literal["done", "step_budget", "token_budget", "cost_budget", "refused"]
CallStatus = Literal["running", "ok", "error", "refused", "declined", "not_run"]
Confirm = Callable[[str, dict[str, Any]], bool | Awaitable[bool]]
OnEvent = Callable[[str, dict[str, Any]], None]


class AgentError(Exception):
    """A run that cannot start: an unknown prompt, a missing prompt argument, no token."""


def now() -> datetime:
    return datetime.now(UTC)


def price_for(model: str) -> tuple[float, float]:
    lowered = model.lower()
    for family, price in PRICES_PER_MTOK.items():
        if family in lowered:
            return price
    return UNKNOWN_MODEL_PRICE




class AgentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(
        default_factory=lambda: os.environ.get(MODEL_ENV) or DEFAULT_MODEL,
        description=f"Claude model id (default ${MODEL_ENV}, else {DEFAULT_MODEL})",
    )
    max_steps: int = Field(30, ge=1, le=1000, description="model turns at most")
    max_tokens_total: int | None = Field(
        500_000, ge=1, description="input + output tokens over the run (None: no cap)"
    )
    max_cost_usd: float | None = Field(5.0, gt=0, description="estimated cost cap (None: no cap)")
    max_tokens_per_turn: int = Field(8192, ge=1, le=128_000, description="max_tokens per request")
    read_only: bool = False
    dry_run: bool = False
    yes: bool = Field(False, description="run destructive tools without asking")
    prompt: str | None = Field(None, description="render this MCP prompt as the playbook")
    transcript_path: Path | None = None
    system: str | None = Field(None, description="extra instructions after the built-in ones")
    tool_timeout_s: float = Field(900.0, gt=0, description="client timeout of one tool call")
    max_result_chars: int = Field(60_000, ge=1000, description="longer tool results are cut")
    price_per_mtok: tuple[float, float] | None = Field(
        None, description="(input, output) USD per million tokens; default from the model id"
    )
    threads: bool = Field(True, description="let the SDK use server-side message threads")

    def price(self) -> tuple[float, float]:
        return self.price_per_mtok or price_for(self.model)


class Usage(BaseModel):
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0

    @property
    def total(self) -> int:
        return (
            self.input_tokens
            + self.output_tokens
            + self.cache_creation_input_tokens
            + self.cache_read_input_tokens
        )

    @classmethod
    def of(cls, usage: BetaUsage) -> Usage:
        return cls(
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cache_creation_input_tokens=usage.cache_creation_input_tokens or 0,
            cache_read_input_tokens=usage.cache_read_input_tokens or 0,
        )

    def add(self, other: Usage) -> None:
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cache_creation_input_tokens += other.cache_creation_input_tokens
        self.cache_read_input_tokens += other.cache_read_input_tokens

    def cost_usd(self, price: tuple[float, float]) -> float:
        price_in, price_out = price
        tokens_in = (
            self.input_tokens
            + CACHE_WRITE_FACTOR * self.cache_creation_input_tokens
            + CACHE_READ_FACTOR * self.cache_read_input_tokens
        )
        return (tokens_in * price_in + self.output_tokens * price_out) / 1_000_000


class ToolCallRecord(BaseModel):
    step: int
    tool_use_id: str | None
    name: str
    arguments: dict[str, Any]
    status: CallStatus
    result: Any = None
    error: str | None = None
    error_data: dict[str, Any] | None = Field(
        None, description="a refused call's typed error as the server sent it: code, message, field"
    )
    progress: list[str] = Field(default_factory=list)
    started_at: datetime
    finished_at: datetime | None = None
    duration_s: float | None = None


class TurnRecord(BaseModel):
    step: int
    message_id: str
    at: datetime
    model: str
    stop_reason: str | None
    usage: Usage
    text: str
    tool_uses: list[dict[str, Any]]


class Evidence(BaseModel):
    """Ids and links seen in tool results: what the answer can be checked against."""

    entry_ids: list[str] = Field(default_factory=list)
    event_ids: list[str] = Field(default_factory=list)
    urls: list[str] = Field(default_factory=list)


class AgentResult(BaseModel):
    goal: str
    answer: str
    stopped_reason: StoppedReason
    final_stop_reason: str | None
    steps: int
    tool_calls: list[ToolCallRecord]
    usage: Usage
    cost_usd: float
    model: str
    dry_run: bool
    prompt_used: str | None
    evidence: Evidence
    transcript_path: Path | None

    def summary(self) -> str:
        """One line on how the run went, for a script to print under the answer."""
        return (
            f"({self.stopped_reason}; {len(self.evidence.entry_ids)} entries; "
            f"{self.steps} steps; ~${self.cost_usd:.2f}; transcript {self.transcript_path})"
        )


class Transcript(BaseModel):
    """The audit record of one run, as written to `transcript_path`."""

    version: int = 1
    goal: str
    started_at: datetime
    finished_at: datetime | None = None
    config: dict[str, Any]
    server: dict[str, Any] = Field(default_factory=dict)
    tools_offered: list[str] = Field(default_factory=list)
    tools_withheld: dict[str, str] = Field(default_factory=dict)
    prompts_available: list[str] = Field(default_factory=list)
    prompt_used: dict[str, Any] | None = None
    system: str = ""
    first_message: str = ""
    turns: list[TurnRecord] = Field(default_factory=list)
    tool_calls: list[ToolCallRecord] = Field(default_factory=list)
    answer: str | None = None
    stopped_reason: StoppedReason | None = None
    usage: Usage = Field(default_factory=Usage)
    cost_usd: float = 0.0
    evidence: Evidence = Field(default_factory=Evidence)
    error: str | None = None

    def save(self, path: Path | None) -> None:
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(self.model_dump_json(indent=2) + "\n")
        os.replace(tmp, path)
