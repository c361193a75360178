"""The Redis Streams data plane, on the real redis-server that scripts/test.d/25-redis.sh
starts: a job appends to its entry's stream with a credential that can do nothing else; a
client that may see the entry gets the coordinates and a reading credential from
`stream_access` and reads Redis directly; another principal gets nothing; credentials end."""

from __future__ import annotations

import os
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from fastmcp import Client
from fastmcp.exceptions import ToolError
from redis.exceptions import AuthenticationError, NoPermissionError

from ground.models import Principal
from mcp_server.server import create_server
from orchestrator.engine import Engine
from tests.conftest import make_settings, shutdown
from tests.mcp_helpers import script_catalogue, structured, wait_entry

WRITER = textwrap.dedent(
    """
    import json, os, time
    import redis
    from redis.exceptions import NoPermissionError

    n = json.load(open(os.environ["SCIORCH_PARAMS"]))["n"]
    key = os.environ["SCIORCH_REDIS_STREAM"]
    r = redis.Redis.from_url(os.environ["SCIORCH_REDIS_URL"])
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        pipe.xadd(key, {"i": i, "t": time.time()})
        if i % 1000 == 999:
            pipe.execute()
    pipe.execute()

    def refused(call):
        try:
            call()
        except NoPermissionError:
            return True
        return False

    out = {"n": n, "read_refused": refused(lambda: r.xlen(key)),
           "other_key_refused": refused(lambda: r.xadd("sciorch:entries:other", {"x": 1}))}
    json.dump(out, open(os.environ["SCIORCH_RESULT"], "w"))
    """
)


def redis_url() -> str:
    url = os.environ.get("SCIORCH_TEST_REDIS")
    if not url:
        why = "no test Redis ($SCIORCH_TEST_REDIS; bash scripts/test.sh starts one)"
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail(f"CI=true and {why}")
        pytest.skip(why)
    return url


@pytest.fixture
async def eng(home: Path, tmp_path: Path) -> AsyncIterator[Engine]:
    cat = script_catalogue(tmp_path, "burst", WRITER, {"n": {"type": "integer"}})
    engine = await Engine.open(make_settings(home, catalogue_dirs=[cat], data_plane=redis_url()))
    try:
        yield engine
    finally:
        await shutdown(engine)


async def test_a_job_streams_to_redis_and_a_client_reads_it_with_its_own_credential(
    eng: Engine,
) -> None:
    alice = Client(create_server(eng, principal=Principal(id="alice")))
    bob = Client(create_server(eng, principal=Principal(id="bob")))
    async with alice, bob:
        entry = structured(
            await alice.call_tool("submit_job", {"service": "burst", "parameters": {"n": 2500}})
        )
        done = (await wait_entry(alice, entry["id"], 120))["entry"]
        assert done["state"] == "succeeded", done["reason"]
        # The job's credential appends to its own stream and does nothing else.
        assert done["result"] == {"n": 2500, "read_refused": True, "other_key_refused": True}

        access = structured(await alice.call_tool("stream_access", {"entry_id": entry["id"]}))
        assert access["plane"] == "redis" and access["stream"] == f"sciorch:entries:{entry['id']}"
        assert access["username"].startswith("sciorch-reader-")
        r: Any = aioredis.from_url(access["url"], decode_responses=True)
        try:
            assert await r.xlen(access["stream"]) == 2500
            first = await r.xrange(access["stream"], count=1)
            assert first[0][1]["i"] == "0"
            got = await r.xread({access["stream"]: "0"}, count=5000)
            assert len(got[0][1]) == 2500
            with pytest.raises(NoPermissionError):
                await r.xadd(access["stream"], {"forged": 1})
            with pytest.raises(NoPermissionError):
                await r.xlen("sciorch:entries:ent-someone-else")
            with pytest.raises(NoPermissionError):
                await r.get("anything")
        finally:
            await r.aclose()

        # Bob may not see the entry: no coordinates, no credential.
        with pytest.raises(ToolError, match="not_found"):
            await bob.call_tool("stream_access", {"entry_id": entry["id"]})

    # Credentials are short-lived: once their time has passed the next grant removes them.
    assert eng.data_plane is not None
    assert await eng.data_plane.sweep(now=time.time() + 86400 * 3) >= 2
    late: Any = aioredis.from_url(access["url"], decode_responses=True)
    try:
        with pytest.raises(AuthenticationError):
            await late.xlen(access["stream"])
    finally:
        await late.aclose()
