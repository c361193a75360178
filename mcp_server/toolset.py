"""The MCP tools: one table row per typed operation in `tools/`, turned into FastMCP tools whose
flat argument list is generated from the operation's pydantic input model, so the schema an
agent sees and the validation the operation does are the same thing."""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from fastmcp import Context, FastMCP
from fastmcp.exceptions import FastMCPError, ResourceError, ToolError
from fastmcp.server.auth import AuthCheck, AuthContext
from fastmcp.tools import FunctionTool, ToolResult
from fastmcp.utilities.json_schema import dereference_refs
from mcp.types import ImageContent, TextContent
from pydantic import BaseModel, ValidationError

import tools
from ground.errors import ERROR_META_KEY, SciorchError, invalid_input
from ground.models import Message, Principal
from orchestrator.engine import Engine
from steering import export
from tools import models as m
from tools import sweeps as sw

Scope = Literal["read", "submit", "admin"]
Refusal = TypeVar("Refusal", bound=FastMCPError)
Op = Callable[..., Awaitable[BaseModel]]


@dataclass(frozen=True)
class ToolSpec:
    name: str
    op: Op
    input: type[BaseModel] | None
    output: type[BaseModel]
    description: str
    scope: Scope
    read_only: bool
    destructive: bool = False
    idempotent: bool = False
    long_running: bool = False  # task-capable, reports progress
    # How the returned model becomes the tool result, when not as structured JSON alone.
    render: Callable[[Any], ToolResult] | None = None


async def search_results(engine: Engine, who: Principal, req: m.SearchResultsInput) -> m.ResultPage:
    """tools.search_results, with the page as CSV when asked (steering.export writes the
    same CSV for campaigns)."""
    page = await tools.search_results(engine, who, req)
    if req.format == "csv":
        page.csv = export.to_csv(*page.table())
    return page


TOOLS: tuple[ToolSpec, ...] = (
    ToolSpec(
        "list_services",
        tools.list_services,
        None,
        m.ServiceList,
        "List the catalogue: every service template with its kind (job runs to completion, "
        "service stays up with a URL), versions, default resources and parameter JSON schema. "
        "Start here to know what can be launched and with which parameters.",
        "read",
        read_only=True,
        idempotent=True,
    ),
    ToolSpec(
        "list_sites",
        tools.list_sites,
        None,
        m.SiteList,
        "List the sites (compute backends) with status, capabilities (CPUs, memory, GPUs and "
        "types, max walltime) and an estimated queue wait. You normally need not pick one: "
        "the router chooses from resource needs and waits.",
        "read",
        read_only=True,
        idempotent=True,
    ),
    ToolSpec(
        "list_events",
        tools.list_events,
        None,
        m.EventList,
        "List the events (allocations) you own or that are shared with you.",
        "read",
        read_only=True,
        idempotent=True,
    ),
    ToolSpec(
        "create_event",
        tools.create_event,
        m.CreateEventInput,
        m.EventView,
        "Open an event: an allocation that groups entries, can be pinned to a site, has an "
        "optional lifetime (ttl_seconds) and can be shared with collaborators. Not idempotent: "
        "each call opens a new event.",
        "submit",
        read_only=False,
    ),
    ToolSpec(
        "stop_event",
        tools.stop_event,
        m.EventRef,
        m.EventView,
        "Stop an event: cancels every entry in it and closes it. Owner only. Idempotent.",
        "submit",
        read_only=False,
        destructive=True,
        idempotent=True,
    ),
    ToolSpec(
        "share_event",
        tools.share_event,
        m.ShareEventInput,
        m.EventView,
        "Share an event with another principal as viewer (read) or operator (also launch "
        "and cancel), or revoke with role 'none'. Owner only. Idempotent.",
        "submit",
        read_only=False,
        idempotent=True,
    ),
    ToolSpec(
        "launch_service",
        tools.launch_service,
        m.LaunchServiceInput,
        m.EntryView,
        "Launch a long-running service (kind 'service', e.g. http-app) and return its entry. "
        "Then call wait_entry until it is 'ready'; the entry's access_url opens it in a browser "
        "(it carries your access token: share it only with people who should get in). "
        "Not idempotent: each call starts a new instance.",
        "submit",
        read_only=False,
    ),
    ToolSpec(
        "submit_job",
        tools.submit_job,
        m.SubmitJobInput,
        m.EntryView,
        "Submit a batch job (kind 'job', e.g. sim-instrument) and return its entry at once. "
        "Then wait_entry for it to finish and read_results for its result. Pass an "
        "idempotency_key to make retries safe: the same key returns the same entry.",
        "submit",
        read_only=False,
        idempotent=True,
    ),
    ToolSpec(
        "get_entry",
        tools.get_entry,
        m.EntryRef,
        m.EntryView,
        "Get one entry: state and reason (e.g. why it is pending or why it failed), every "
        "transition with its time, exit code, result, URL.",
        "read",
        read_only=True,
        idempotent=True,
    ),
    ToolSpec(
        "list_entries",
        tools.list_entries,
        m.ListEntriesInput,
        m.EntryPage,
        "List entries you can see, oldest first, filtered by event, states or service. "
        "Paginated: pass next_cursor back as cursor for the next page.",
        "read",
        read_only=True,
        idempotent=True,
    ),
    ToolSpec(
        "wait_entry",
        tools.wait_entry,
        m.WaitEntryInput,
        m.WaitResult,
        "Wait until an entry is finished (jobs) or ready (services), at most timeout_seconds. "
        "Reports progress with each state change and intermediate result while it waits. "
        "Returns timed_out=true if the time ran out first (call again to keep waiting).",
        "read",
        read_only=True,
        idempotent=True,
        long_running=True,
    ),
    ToolSpec(
        "read_logs",
        tools.read_logs,
        m.ReadLogsInput,
        m.LogsChunk,
        "Read an entry's log (stdout and stderr) from a byte offset; pass next_offset back to "
        "continue. complete=true once the entry has finished and everything has been read.",
        "read",
        read_only=True,
        idempotent=True,
    ),
    ToolSpec(
        "read_results",
        tools.read_results,
        m.ReadResultsInput,
        m.Results,
        "Read an entry's results: the final result object (once finished), intermediate "
        "records streamed while it runs (from since_record on) and the artifact files.",
        "read",
        read_only=True,
        idempotent=True,
    ),
    ToolSpec(
        "read_artifact",
        tools.read_artifact,
        m.ReadArtifactInput,
        m.ArtifactContent,
        "Read one artifact file of an entry (a path from read_results' artifacts). Text "
        "(CSV, JSON, logs) comes back as text; a PNG, JPEG, GIF or WebP image comes back as "
        "an image you can look at; other files as base64. At most 1 MiB per call: pass "
        "next_offset back as offset until eof is true.",
        "read",
        read_only=True,
        idempotent=True,
        render=lambda c: artifact_result(c),
    ),
    ToolSpec(
        "upload_input",
        tools.upload_input,
        m.UploadInput,
        m.UploadView,
        "Upload a small file (at most 128 KiB, as text or base64) to pass to a job as an input: "
        "submit_job(..., inputs={name: uri}) with the uri returned. Bigger files go over "
        "HTTP (POST /uploads). Only you can use what you upload. Not idempotent.",
        "submit",
        read_only=False,
    ),
    ToolSpec(
        "cancel_entry",
        tools.cancel_entry,
        m.EntryRef,
        m.EntryView,
        "Cancel an entry (stops its processes). Idempotent: a finished entry is returned as it is.",
        "submit",
        read_only=False,
        destructive=True,
        idempotent=True,
    ),
    ToolSpec(
        "search_results",
        search_results,
        m.SearchResultsInput,
        m.ResultPage,
        "Search the results catalogue: finished entries you may see, with their parameters, "
        "result, artifacts and provenance (service@version, event, campaign and evaluation, "
        "site, account, start/end, template checksum). Filter by service, event, campaign, "
        'time and a query on parameter/result fields (surface = "branin" and value < 0.5); '
        "sort by time or a numeric field; page with next_cursor. format=csv also returns the "
        "page as CSV text.",
        "read",
        read_only=True,
        idempotent=True,
    ),
    ToolSpec(
        "submit_sweep",
        sw.submit_sweep,
        sw.SubmitSweepInput,
        sw.SweepView,
        "Run one job template over a list (parameter_sets) or a grid of parameter sets: one "
        "entry per element, grouped by a sweep id, run as a native array where the site has "
        "one (a Slurm job array), at most `throttle` at once. Every element is validated first; "
        "an error names the element's index and field. Use get_entry/read_results per element.",
        "submit",
        read_only=False,
        idempotent=True,
    ),
    ToolSpec(
        "get_sweep",
        sw.get_sweep,
        sw.SweepRef,
        sw.SweepView,
        "A sweep's elements with their states, results (when small) and counts per state.",
        "read",
        read_only=True,
        idempotent=True,
    ),
    ToolSpec(
        "stream_access",
        tools.stream_access,
        m.StreamAccessInput,
        m.StreamAccess,
        "Where an entry's high-rate stream records are: with the Redis data plane, the "
        "stream's host, port and key and a short-lived credential that may only read it "
        "(XREAD/XRANGE it directly; a new one per call); without it, plane=control (records "
        "come through wait_entry and read_results).",
        "read",
        read_only=True,
    ),
    ToolSpec(
        "wait_sweep",
        sw.wait_sweep,
        sw.WaitSweepInput,
        sw.SweepWaitResult,
        "Wait until every element of a sweep has finished (or timeout_seconds pass).",
        "read",
        read_only=True,
        idempotent=True,
        long_running=True,
    ),
    ToolSpec(
        "cancel_sweep",
        sw.cancel_sweep,
        sw.SweepRef,
        sw.SweepView,
        "Cancel every element of a sweep still queued or running (cancel_entry stops one).",
        "submit",
        read_only=False,
        destructive=True,
        idempotent=True,
    ),
    ToolSpec(
        "extend_entry",
        sw.extend_entry,
        sw.ExtendEntryInput,
        m.EntryView,
        "Give a running entry more time (its new whole walltime), where the site allows it "
        "(Slurm: scontrol update TimeLimit). A site that cannot says why (not_supported).",
        "submit",
        read_only=False,
        idempotent=True,
    ),
)


def refused(kind: type[Refusal], text: str) -> Refusal:
    """The error a client gets for a request sciorch refuses (bad input, unknown id, not
    allowed): logged at INFO, since the server did nothing wrong (fastmcp's default is ERROR)."""
    return kind(text, log_level=logging.INFO)


class Refused(ToolError):
    """A refused tool call that keeps its typed error, so the server's ErrorResults
    middleware can answer with the error as data; without it, the one-line text remains."""

    def __init__(self, error: SciorchError) -> None:
        super().__init__(error.text(), log_level=logging.INFO)
        self.error = error


def refusal(exc: SciorchError | ValidationError) -> Refused:
    if isinstance(exc, ValidationError):
        exc = invalid_input(exc, default_field="arguments")
    return Refused(exc)


def refused_read(exc: SciorchError | ValidationError) -> ResourceError:
    """The error of a refused resource read. fastmcp logs every resource error with its
    traceback; a refusal is no fault of the server's, so that goes to DEBUG."""
    return ResourceError(refusal(exc).error.text(), log_level=logging.DEBUG)


def error_result(error: SciorchError) -> ToolResult:
    """The isError result of a refused call: the one-line text, and the error as data
    (code, message, field) in `_meta`."""
    return ToolResult(
        content=[TextContent(type="text", text=error.text())],
        meta={ERROR_META_KEY: error.to_dict()},
        is_error=True,
    )


def progress_reporter(ctx: Context | None) -> Callable[[Message], Awaitable[None]] | None:
    """State changes and intermediate records become MCP progress (or task status)."""
    if ctx is None:
        return None
    count = 0

    async def report(msg: Message) -> None:
        nonlocal count
        count += 1
        if msg.kind == "transition":
            text = f"state: {msg.state.value if msg.state else '?'}"
            if msg.reason:
                text += f" ({msg.reason})"
        else:
            text = f"record {msg.record_index}: {msg.record}"
        await ctx.report_progress(count, None, text[:2000])

    return report


def as_tool_result(model: BaseModel) -> ToolResult:
    """The result fastmcp would make of a returned model (structured content and the same JSON
    as text), serialized once for each: fastmcp's conversion serializes it three times."""
    structured = model.model_dump(mode="json")
    return ToolResult(
        content=[TextContent(type="text", text=model.model_dump_json())],
        structured_content=structured,
    )


def artifact_result(content: m.ArtifactContent) -> ToolResult:
    """Text as text, an image as image content (its bytes only there, not also in the
    structured content), other bytes as base64 in the structured content."""
    if content.encoding == "image" and content.data is not None:
        meta = content.model_copy(update={"data": None})
        return ToolResult(
            content=[
                ImageContent(type="image", data=content.data, mime_type=content.mime_type),
                TextContent(type="text", text=meta.model_dump_json()),
            ],
            structured_content=meta.model_dump(mode="json"),
        )
    if content.encoding == "text" and content.data is not None:
        return ToolResult(
            content=[TextContent(type="text", text=content.data)],
            structured_content=content.model_dump(mode="json"),
        )
    return as_tool_result(content)


def build_tool(
    spec: ToolSpec, engine: Engine, principal_of: Callable[[], Principal]
) -> Callable[..., Awaitable[ToolResult]]:
    """A function FastMCP can register: keyword arguments exactly the input model's fields."""
    params: list[inspect.Parameter] = []
    fields = spec.input.model_fields if spec.input else {}
    for name, info in fields.items():
        has_default = not info.is_required() and info.default_factory is None
        params.append(
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=info.default if has_default else inspect.Parameter.empty,
                annotation=Annotated[info.annotation, info],
            )
        )
    if spec.long_running:
        params.append(
            inspect.Parameter(
                "ctx", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Context | None
            )
        )

    async def run(kwargs: dict[str, Any], ctx: Context | None) -> BaseModel:
        principal = principal_of()
        try:
            if spec.input is None:
                return await spec.op(engine, principal)
            req = spec.input.model_validate(kwargs)
            if spec.long_running:
                return await spec.op(engine, principal, req, progress_reporter(ctx))
            return await spec.op(engine, principal, req)
        except (SciorchError, ValidationError) as exc:
            raise refusal(exc) from exc

    async def call(**kwargs: Any) -> ToolResult:
        ctx = kwargs.pop("ctx", None)
        try:
            return (spec.render or as_tool_result)(await run(kwargs, ctx))
        except Refused as exc:
            # A task-run call's errors never reach the ErrorResults middleware (the tasks
            # extension turns them into a plain error result): answer with the data here.
            # Only the read-only long-running tools do, so the audit log misses nothing.
            if spec.long_running:
                return error_result(exc.error)
            raise

    call.__name__ = spec.name
    call.__doc__ = spec.description
    call.__signature__ = inspect.Signature(params, return_annotation=spec.output)  # type: ignore[attr-defined]
    call.__annotations__ = {p.name: p.annotation for p in params} | {"return": spec.output}
    return call


# Keywords that constrain every instance, null included: a member holding one cannot simply
# be widened to accept null.
_NOT_WIDENABLE = frozenset({"anyOf", "oneOf", "allOf", "not", "$ref", "const", "if"})


def compact_nullable(schema: Any) -> Any:
    """The same schema with pydantic's `anyOf: [X, {type: null}]` for optional fields written as
    X with `type: [X's type, "null"]`. Clients validate every structured result against the
    output schema (the SDK with jsonschema, fastmcp through a type adapter it looks up by the
    schema's text); each anyOf costs them a sub-validation per field, about half of get_entry's
    client-side cost. Type-specific keywords (format, properties, ...) do not apply to null;
    an enum gets null added."""
    if isinstance(schema, list):
        return [compact_nullable(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: compact_nullable(v) for k, v in schema.items()}
    members = out.get("anyOf")
    if isinstance(members, list) and len(members) == 2 and {"type": "null"} in members:
        other = members[1 - members.index({"type": "null"})]
        if (
            isinstance(other, dict)
            and isinstance(other.get("type"), str)
            and not (_NOT_WIDENABLE & other.keys())
            and not (other.keys() & (out.keys() - {"anyOf"}))
        ):
            del out["anyOf"]
            out.update(other)
            out["type"] = [other["type"], "null"]
            if "enum" in other:
                out["enum"] = [*other["enum"], None]
    return out


def published_output_schema(schema: dict[str, Any] | None) -> dict[str, Any] | None:
    """What a tool's output schema is listed as: definitions inlined, then optionals compacted
    (an optional enum is a $ref until inlined)."""
    return None if schema is None else compact_nullable(dereference_refs(schema))


# Scopes nest: admin can do what submit can, submit what read can.
IMPLIED: dict[Scope, frozenset[str]] = {
    "read": frozenset({"read", "submit", "admin"}),
    "submit": frozenset({"submit", "admin"}),
    "admin": frozenset({"admin"}),
}


def scope_check(scope: Scope) -> Callable[[AuthContext], bool]:
    granted_by = IMPLIED[scope]

    def check(ctx: AuthContext) -> bool:
        return ctx.token is not None and bool(granted_by & set(ctx.token.scopes))

    return check


def register_tools(
    mcp: FastMCP,
    specs: Iterable[ToolSpec],
    engine: Engine,
    principal_of: Callable[[], Principal],
    *,
    auth: bool,
    read_only: bool,
    disable_destructive: bool,
) -> list[ToolSpec]:
    """Register the specs the switches allow; returns those registered. With `auth`, each tool
    is gated by its scope (and hidden from callers without it)."""
    registered: list[ToolSpec] = []
    schemas: dict[str, dict[str, Any]] = {}
    for spec in specs:
        if (read_only and not spec.read_only) or (disable_destructive and spec.destructive):
            continue
        checks: list[AuthCheck] | None = [scope_check(spec.scope)] if auth else None
        fn = build_tool(spec, engine, principal_of)
        generated = FunctionTool.from_function(fn, name=spec.name)
        mcp.tool(
            fn,
            name=spec.name,
            output_schema=published_output_schema(generated.output_schema),
            description=spec.description,
            annotations={
                "readOnlyHint": spec.read_only,
                "destructiveHint": spec.destructive,
                "idempotentHint": spec.idempotent,
                "openWorldHint": False,
            },
            task=spec.long_running,
            auth=checks,
        )
        registered.append(spec)
        schemas[spec.name] = generated.parameters
    # Over the 2026-07-28 HTTP transport the SDK checks each tools/call's Mcp-Param headers
    # against the tool's input schema; without this lookup it gets the schema by running a
    # whole tools/list (every middleware, schema dereferencing) on every call, which costs
    # several times the call itself. Chained, so several register_tools calls add up.
    previous = mcp._mcp_server.get_tool_input_schema

    def input_schema(name: str) -> Mapping[str, Any] | None:
        if name in schemas:
            return schemas[name]
        return previous(name) if previous is not None else None

    mcp._mcp_server.get_tool_input_schema = input_schema
    return registered


def hold_while_serving(
    mcp: FastMCP, serving: Callable[[], contextlib.AbstractAsyncContextManager[None]]
) -> None:
    """Hold `serving()` (a manager's: resume its work, stop it at the end) for as long as the
    server's MCP lifespan runs."""
    inner = mcp._lifespan

    @contextlib.asynccontextmanager
    async def lifespan(server: Any) -> AsyncIterator[Any]:
        async with inner(server) as state, serving():
            yield state

    mcp._lifespan = lifespan
