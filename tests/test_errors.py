"""Refusals as typed data: every bad input to every tool and resource is answered with one
'code: message [field: x]' line and the same error as data in the result's `_meta`
(`sciorch/error`), and the server logs no traceback for any of it.

The fuzz tests drive a real MCP client (fastmcp in memory for breadth, the official SDK over
streamable HTTP with the current protocol for a subset) with values of the wrong JSON type at
the top level and inside nested objects: null, booleans, lists, objects, deep nesting, huge
and non-finite numbers, huge strings."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx2
import pytest
import pytest_asyncio
from fastmcp import Client, FastMCP
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from ground.errors import (
    ERROR_META_KEY,
    Conflict,
    InvalidInput,
    SciorchError,
    invalid_input,
    reason_line,
)
from ground.models import EntryState, Principal, ResourceRequest
from mcp_server.server import create_server
from orchestrator.engine import Engine
from steering.client import ToolFailed, Tools
from tests.mcp_helpers import (
    ERROR_LINE,
    INITIALIZE,
    MCP_HEADERS,
    TRACEBACK_MARKS,
    HttpServer,
    assert_no_traceback,
    module_engine,
    run_http_server,
    sdk_client,
    structured,
    text_of,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

FUZZER = Principal(id="fuzzer")
FIELD_CODES = ("invalid_input", "invalid_parameters")


# ------------------------------------------------------------------ fixtures


class Captured(logging.Handler):
    """Every record the server logs (fastmcp's loggers do not propagate to the root)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def assert_no_traceback(self) -> None:
        for rec in self.records:
            text = rec.getMessage() + (
                logging.Formatter().formatException(rec.exc_info) if rec.exc_info else ""
            )
            assert not rec.exc_info and "Traceback" not in text, (
                f"the server logged a traceback: {rec.name}: {text[:2000]}"
            )


@contextlib.contextmanager
def server_logs() -> Iterator[Captured]:
    handler = Captured()
    loggers = [logging.getLogger(), logging.getLogger("fastmcp")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        yield handler
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


eng = module_engine("errors")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(eng: Engine) -> FastMCP:
    return create_server(eng, principal=FUZZER, rate_per_second=100_000)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(server: FastMCP) -> AsyncIterator[Client[Any]]:
    async with Client(server) as c:
        yield c


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def schemas(client: Client[Any]) -> dict[str, dict[str, Any]]:
    return {t.name: t.input_schema for t in await client.list_tools()}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def http(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[HttpServer]:
    async with run_http_server(tmp_path_factory.mktemp("errors-http") / "home") as srv:
        yield srv


# ------------------------------------------------------------------ checks


def error_data(result: Any) -> dict[str, Any]:
    """The typed error of an isError result: its one-line text and its `_meta` data agree."""
    assert result.is_error, f"expected a refusal, got {text_of(result)[:300]}"
    text = text_of(result)
    assert_no_traceback(text)
    assert ERROR_LINE.match(text), f"not a 'code: message' line: {text!r}"
    assert "\n" not in text, text
    data = (result.meta or {}).get(ERROR_META_KEY)
    assert isinstance(data, dict), f"no error data in _meta: {result.meta!r}"
    assert text.startswith(f"{data['code']}: {data['message']}"), (text, data)
    if data.get("field"):
        assert f"[field: {data['field']}]" in text
    return data


def assert_refused(result: Any, code: str, field: str) -> dict[str, Any]:
    data = error_data(result)
    assert data["code"] == code, data
    assert data.get("field") == field, data
    return data


# ------------------------------------------------------------------ each defect


DEFECTS: list[tuple[str, dict[str, Any], str, str]] = [
    # untyped errors (TypeError/AttributeError/OverflowError in the parsers)
    *[
        (
            "submit_job",
            {"service": "sim-instrument", "resources": {key: bad}},
            "invalid_input",
            f"resources.{key}",
        )
        for key in ("memory", "walltime")
        for bad in (None, [1], {"a": 1}, math.inf, 1e400, 10**400, "9" * 400, True)
    ],
    (
        "submit_job",
        {"service": "sim-instrument", "resources": {"walltime": 1e300}},
        "invalid_input",
        "resources.walltime",
    ),
    (
        "submit_job",
        {"service": "sim-instrument", "resources": {"memory_mb": 10**30}},
        "invalid_input",
        "resources.memory_mb",
    ),
    (
        "submit_job",
        {"service": "sim-instrument", "resources": {"walltime": "9" * 400 + "s"}},
        "invalid_input",
        "resources.walltime",
    ),
    (
        "start_campaign",
        {
            "objective": {"service": "sim-instrument"},
            "space": [{"name": "x1", "low": 0, "high": 1}],
            "budget": {"wall_time_s": 10**400},
        },
        "invalid_input",
        "budget.wall_time_s",
    ),
    (
        "start_campaign",
        {
            "objective": {"service": "sim-instrument"},
            "space": [{"name": "x1", "low": 0, "high": 1}],
            "budget": {"wall_time_s": "9" * 400},
        },
        "invalid_input",
        "budget.wall_time_s",
    ),
    # lax inputs
    ("read_logs", {"entry_id": "ent-000000000000", "limit": True}, "invalid_input", "limit"),
    (
        "read_results",
        {"entry_id": "ent-000000000000", "since_record": False},
        "invalid_input",
        "since_record",
    ),
    (
        "wait_entry",
        {"entry_id": "ent-000000000000", "timeout_seconds": True},
        "invalid_input",
        "timeout_seconds",
    ),
    ("create_event", {"ttl_seconds": True}, "invalid_input", "ttl_seconds"),
    # and numbers (or "yes") where a flag is expected
    ("list_campaigns", {"include_finished": 0}, "invalid_input", "include_finished"),
    (
        "get_campaign",
        {"campaign_id": "cmp-000000000000", "evaluations": "yes"},
        "invalid_input",
        "evaluations",
    ),
    (
        "submit_job",
        {"service": "sim-instrument", "resources": {"gpus": True}},
        "invalid_input",
        "resources.gpus",
    ),
    ("submit_job", {"service": "sim-instrument", "event_id": ""}, "invalid_input", "event_id"),
    ("launch_service", {"service": "http-app", "event_id": ""}, "invalid_input", "event_id"),
    ("list_entries", {"event_id": ""}, "invalid_input", "event_id"),
    ("submit_job", {"service": "sim-instrument", "site": ""}, "invalid_input", "site"),
    (
        "submit_job",
        {"service": "sim-instrument", "parameters": {"x1": 1e308}},
        "invalid_parameters",
        "parameters.x1",
    ),
    (
        "start_campaign",
        {
            "objective": {"service": "sim-instrument"},
            "space": [{"name": "x1", "low": 0, "high": 1}],
            "batch_size": True,
        },
        "invalid_input",
        "batch_size",
    ),
    # the size cap names the argument that is too large
    ("get_entry", {"entry_id": "x" * (300 * 1024)}, "invalid_input", "entry_id"),
    ("create_event", {"name": "n", "site": "s" * (300 * 1024)}, "invalid_input", "site"),
]


@pytest.mark.parametrize(
    ("tool", "args", "code", "field"),
    DEFECTS,
    ids=[f"{t}-{f}-{i}" for i, (t, _a, _c, f) in enumerate(DEFECTS)],
)
async def test_each_bad_input_is_a_typed_refusal_naming_its_field(
    client: Client[Any], tool: str, args: dict[str, Any], code: str, field: str
) -> None:
    with server_logs() as logs:
        result = await client.call_tool(tool, args, raise_on_error=False)
    assert_refused(result, code, field)
    logs.assert_no_traceback()


async def test_the_size_refusal_says_how_large_the_argument_and_the_limit_are(
    client: Client[Any],
) -> None:
    result = await client.call_tool("get_entry", {"entry_id": "x" * 300_000}, raise_on_error=False)
    text = text_of(result)
    assert "entry_id: 300002 bytes" in text and "262144" in text, text


async def test_a_resource_id_longer_than_any_id_is_a_typed_error(client: Client[Any]) -> None:
    for suffix in ("", "/log", "/results"):
        with server_logs() as logs, pytest.raises(Exception) as info:
            await client.read_resource(f"sciorch://entries/{'e' * 70}{suffix}")
        text = str(info.value)
        assert text.startswith("invalid_input: entry_id: "), text
        assert "[field: entry_id]" in text, text
        logs.assert_no_traceback()


async def test_sharing_a_stopped_event_is_refused_and_revoking_still_works(
    client: Client[Any],
) -> None:
    event = structured(await client.call_tool("create_event", {"name": "to-stop"}))
    shared = await client.call_tool(
        "share_event", {"event_id": event["id"], "principal": "bob", "role": "viewer"}
    )
    assert structured(shared)["shares"] == {"bob": "viewer"}
    await client.call_tool("stop_event", {"event_id": event["id"]})
    refused = await client.call_tool(
        "share_event", {"event_id": event["id"], "principal": "carol"}, raise_on_error=False
    )
    assert_refused(refused, Conflict.code, "event_id")
    assert "stopped" in text_of(refused)
    revoked = await client.call_tool(
        "share_event", {"event_id": event["id"], "principal": "bob", "role": "none"}
    )
    assert structured(revoked)["shares"] == {}


async def test_a_failure_reason_is_one_line_without_the_traceback(eng: Engine) -> None:
    """The traceback stays in the log; the reason clients read is one line with the error."""
    entry = await eng.launch(FUZZER, "sim-instrument", {"duration_s": 30}, kind="job")
    tail = (
        "exit code 1; log tail:\n[sim-instrument] measuring\nTraceback (most recent call last):\n"
        '  File "/x/sim_instrument.py", line 3, in <module>\n    main()\n    ^^^^^^\n'
        "OverflowError: (34, 'Numerical result out of range')"
    )
    await eng.transition(entry.id, EntryState.FAILED, reason=tail, exit_code=1)
    done = await eng.get_entry(FUZZER, entry.id)
    assert done.reason == (
        "exit code 1; log tail: [sim-instrument] measuring | "
        "OverflowError: (34, 'Numerical result out of range')"
    )
    for mark in TRACEBACK_MARKS:
        assert mark not in (done.reason or "")
    assert all("\n" not in (t.reason or "") for t in done.transitions)


async def test_reason_line_keeps_text_that_is_no_traceback() -> None:
    assert reason_line("exit code 3") == "exit code 3"
    assert reason_line("health check failed; log tail:\nline a\n\nline b") == (
        "health check failed; log tail: line a | line b"
    )
    assert len(reason_line("x" * 10_000)) <= 2000


async def test_one_formatter_names_nested_fields_everywhere() -> None:
    with pytest.raises(Exception) as info:
        ResourceRequest.model_validate({"memory": None})
    err = invalid_input(info.value)  # type: ignore[arg-type]
    assert err.field == "memory" and err.message.startswith("memory: ")
    with pytest.raises(Exception) as both:
        ResourceRequest.model_validate({"cpus": "many", "gpus": True})
    message = invalid_input(both.value).message  # type: ignore[arg-type]
    assert message == (
        "cpus: Input should be a valid number, unable to parse string as a number; "
        "gpus: expected a number, not true or false"
    )
    assert invalid_input(info.value, where="site 'x'", field_prefix="sites.x.").field == (  # type: ignore[arg-type]
        "sites.x.memory"
    )
    again = SciorchError.from_dict(err.to_dict())
    assert isinstance(again, InvalidInput) and again.text() == err.text()


# ------------------------------------------------------------------ the fuzz test

# Values of every wrong kind. Deep nesting: a list 200 deep.
_deep: Any = 0
for _ in range(200):
    _deep = [_deep]
WRONG = [
    None,
    True,
    False,
    [],
    [1, "a"],
    {},
    {"a": {"b": {"c": None}}},
    _deep,
    1e308,
    -1e308,
    10**400,
    -(10**400),
    "",
    "x" * 5000,
    "9" * 400,
    "\u0000\ufffd☃",
    -1,
    0,
    2**63,
]
# No inf or nan: JSON has none, and the clients send them as null.

# Arguments that pass the schema but start no real work: ids that exist nowhere, a
# service that is not in the catalogue.
MINIMAL: dict[str, dict[str, Any]] = {
    "submit_job": {"service": "no-such-service"},
    "launch_service": {"service": "no-such-service"},
    "start_campaign": {
        "objective": {"service": "no-such-service"},
        "space": [{"name": "x1", "low": 0, "high": 1}],
    },
    "share_event": {"event_id": "evt-000000000000", "principal": "bob"},
    "tell_campaign": {"point_id": "cmp-000000000000:0"},  # one of point_id or point
}
IDS = {
    "entry_id": "ent-000000000000",
    "event_id": "evt-000000000000",
    "campaign_id": "cmp-000000000000",
}


def _minimal(tool: str, schema: dict[str, Any]) -> dict[str, Any]:
    args = dict(MINIMAL.get(tool, {}))
    for name in schema.get("required", []):
        args.setdefault(name, IDS.get(name, "x"))
    return args


def _paths(schema: dict[str, Any]) -> list[tuple[str, ...]]:
    """Every property of the tool's input, and those of its nested objects (one level of
    $ref/anyOf resolved), plus the aliases the resources accept."""
    defs = schema.get("$defs", {})

    def resolve(s: dict[str, Any]) -> dict[str, Any]:
        if "$ref" in s:
            return resolve(defs[s["$ref"].rsplit("/", 1)[-1]])
        for key in ("anyOf", "oneOf"):
            for option in s.get(key, []):
                r = resolve(option)
                if r.get("type") == "object" or "properties" in r:
                    return r
        return s

    out: list[tuple[str, ...]] = []
    for name, prop in schema.get("properties", {}).items():
        out.append((name,))
        nested = resolve(prop)
        for sub in nested.get("properties", {}):
            out.append((name, sub))
        if name == "resources":
            out += [(name, "memory"), (name, "walltime")]
        if nested.get("type") == "array":
            item = resolve(nested.get("items", {}))
            for sub in item.get("properties", {}):
                out.append((name, "0", sub))
    return out


def _put(args: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    out = json.loads(json.dumps(args))
    node: Any = out
    for key in path[:-1]:
        if key == "0":
            if not isinstance(node, list) or not node:
                return out  # nothing there to corrupt
            node = node[0]
            continue
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[path[-1]] = value
    return out


def _valid(schema: dict[str, Any], args: dict[str, Any]) -> bool:
    try:
        return not any(Draft202012Validator(schema).iter_errors(args))
    except (OverflowError, RecursionError, ValueError):
        return False


def _check(
    tool: str, schema: dict[str, Any], path: tuple[str, ...], args: dict[str, Any], result: Any
) -> None:
    """Refused with a typed error naming the corrupted field (or a field above it, or the
    thing it names not existing), or answered, if the advertised schema admits the value."""
    if not result.is_error:
        assert _valid(schema, args), f"{tool} accepted {path}={args!r:.300} against its schema"
        return
    data = error_data(result)
    if data["code"] in FIELD_CODES:
        field = data.get("field") or ""
        assert field, f"{tool}: {data} names no field for {path}"
        top = field.split(".")[0]
        assert top in args or top in schema.get("required", []), (tool, path, data)


def _tool_paths(schemas: dict[str, dict[str, Any]]) -> list[tuple[str, tuple[str, ...]]]:
    return [(tool, path) for tool, schema in sorted(schemas.items()) for path in _paths(schema)]


FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@FUZZ
@given(data=st.data())
async def test_fuzz_every_tool_with_type_confusing_nested_values(
    client: Client[Any], schemas: dict[str, dict[str, Any]], data: st.DataObject
) -> None:
    tool, path = data.draw(st.sampled_from(_tool_paths(schemas)), label="field")
    value = data.draw(st.sampled_from(WRONG), label="value")
    args = _put(_minimal(tool, schemas[tool]), path, value)
    with server_logs() as logs:
        result = await client.call_tool(tool, args, raise_on_error=False)
    _check(tool, schemas[tool], path, args, result)
    logs.assert_no_traceback()


async def test_every_tool_field_gets_every_wrong_kind_once(
    client: Client[Any], schemas: dict[str, dict[str, Any]]
) -> None:
    """The exhaustive pass the fuzz test samples from: each field of each tool, each wrong
    kind of value (the big ones only at the top level, to keep it short)."""
    calls = 0
    with server_logs() as logs:
        for tool, path in _tool_paths(schemas):
            for value in WRONG[:8] + WRONG[8:16] * (len(path) == 1):
                args = _put(_minimal(tool, schemas[tool]), path, value)
                result = await client.call_tool(tool, args, raise_on_error=False)
                _check(tool, schemas[tool], path, args, result)
                calls += 1
    logs.assert_no_traceback()
    assert calls > 300


RESOURCE_IDS = [
    "",
    "e" * 70,
    "e" * 5000,
    "../../etc/passwd",
    "%00",
    "ent-\u0000",
    "☃" * 40,
    "ent-000000000000",
]


@pytest.mark.parametrize(
    "uri",
    [
        "sciorch://entries/{}",
        "sciorch://entries/{}/log",
        "sciorch://entries/{}/results",
        "sciorch://campaigns/{}",
    ],
)
async def test_fuzz_every_resource_with_junk_ids(client: Client[Any], uri: str) -> None:
    with server_logs() as logs:
        for rid in RESOURCE_IDS:
            with pytest.raises(Exception) as info:
                await client.read_resource(uri.format(rid))
            text = str(info.value)
            assert_no_traceback(text)
            assert ERROR_LINE.match(text) or text.startswith(
                ("Unknown resource", "Resource not found")
            ), text
    logs.assert_no_traceback()


# ------------------------------------------------------------------ over streamable HTTP


async def test_error_data_over_streamable_http_with_the_current_protocol(http: HttpServer) -> None:
    schemas: dict[str, dict[str, Any]] = {}
    with server_logs() as logs:
        async with sdk_client(http.mcp_url, http.token("fuzzer")) as c:
            assert c.protocol_version == "2026-07-28"
            schemas = {t.name: t.input_schema for t in (await c.list_tools()).tools}
            result = await c.call_tool(
                "submit_job", {"service": "sim-instrument", "resources": {"memory": None}}
            )
            assert_refused(result, "invalid_input", "resources.memory")
            for tool, path in _tool_paths(schemas)[::3]:
                for value in (None, True, [1], {"a": 1}, 10**400, "x" * 5000):
                    args = _put(_minimal(tool, schemas[tool]), path, value)
                    _check(tool, schemas[tool], path, args, await c.call_tool(tool, args))
        async with sdk_client(http.mcp_url, http.token("fuzzer"), mode="legacy") as old:
            assert old.protocol_version == "2025-11-25"
            result = await old.call_tool("read_logs", {"entry_id": "ent-0", "limit": True})
            assert_refused(result, "invalid_input", "limit")
    logs.assert_no_traceback()


async def test_the_steering_client_reads_the_error_data(http: HttpServer, server: FastMCP) -> None:
    from fastmcp.client.auth import BearerAuth

    for make in (
        lambda: Client(server),
        lambda: Client(http.mcp_url, auth=BearerAuth(http.token("fuzzer"))),
    ):
        async with Tools(make, patience_s=5) as tools:
            with pytest.raises(ToolFailed) as info:
                await tools.call(
                    "submit_job", {"service": "sim-instrument", "resources": {"walltime": [1]}}
                )
            assert (info.value.code, info.value.field) == ("invalid_input", "resources.walltime")
            assert info.value.message.startswith("resources.walltime: ")


async def test_tool_failed_takes_code_and_field_from_the_data_not_the_text() -> None:
    from fastmcp.client.client import CallToolResult
    from mcp.types import TextContent

    error = Conflict("event 'evt-1' is stopped [see: docs]", field="event_id")
    result = CallToolResult(
        content=[TextContent(type="text", text="refused, see the data")],
        structured_content=None,
        meta={ERROR_META_KEY: error.to_dict()},
        data=None,
        is_error=True,
    )
    failed = ToolFailed.of("share_event", result)
    assert (failed.code, failed.field, failed.message) == ("conflict", "event_id", error.message)


# ------------------------------------------------------------------ tokens




async def test_tokens_without_a_subject_or_not_yet_valid_get_401_with_the_reason(
    http: HttpServer,
) -> None:
    now = int(time.time())
    cases = {
        "no sub": (http.sign(sub=None), "'sub'"),
        "empty sub": (http.sign(sub=""), "'sub'"),
        "blank sub": (http.sign(sub="   "), "'sub'"),
        "sub too long": (http.sign(sub="m" * 300), "'sub'"),
        "future nbf": (http.sign(nbf=now + 3600), "'nbf'"),
    }
    async with httpx2.AsyncClient() as raw:
        for why, (token, needle) in cases.items():
            headers = {**MCP_HEADERS, "authorization": f"Bearer {token}"}
            resp = await raw.post(http.mcp_url + "/", json=INITIALIZE, headers=headers)
            assert resp.status_code == 401, (why, resp.status_code, resp.text)
            body = resp.json()
            assert body["error"] == "invalid_token" and needle in body["error_description"], why
            assert needle in resp.headers["www-authenticate"], why
            assert_no_traceback(resp.text)
        ok = http.sign(nbf=now - 5)
        resp = await raw.post(
            http.mcp_url + "/",
            json=INITIALIZE,
            headers={**MCP_HEADERS, "authorization": f"Bearer {ok}"},
        )
        assert resp.status_code == 200, resp.text
