"""Versions side by side: one service in a stable and a dev version (semver: a pre-release is a
dev version), through the real MCP SDK client over streamable HTTP and the real local backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mcp
import pytest

from orchestrator.catalogue import Catalogue, default_version, load_template, version_key
from tests.mcp_helpers import assert_tool_error, run_http_server, sdk_client, structured

DEMO = """\
name: demo
version: {version}
kind: job
description: demo service, version {version}
command: ["sh", "-c", "echo ran demo {version}"]
"""
VERSIONS = ["0.9.0", "1.0.0", "1.1.0-dev", "1.0.1-rc.1"]


@pytest.fixture
def catalogue_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "catalogue"
    folder.mkdir()
    for v in VERSIONS:
        (folder / f"demo-{v}.yaml").write_text(DEMO.format(version=v))
    return folder


def test_semver_order_puts_a_prerelease_before_its_release() -> None:
    ordered = ["0.9.0", "1.0.0", "1.0.1-rc.1", "1.0.1-rc.2", "1.0.1", "1.1.0-dev", "1.10.0"]
    assert sorted(reversed(ordered), key=version_key) == ordered
    assert default_version(ordered) == "1.10.0"
    assert default_version(["1.0.0", "2.0.0-dev"]) == "1.0.0"
    assert default_version(["2.0.0-dev", "2.0.0-alpha"]) == "2.0.0-dev"  # no stable: newest dev


def test_the_default_is_the_newest_stable_version(catalogue_dir: Path) -> None:
    cat = Catalogue(load_template(p) for p in sorted(catalogue_dir.iterdir()))
    assert cat.get("demo").version == "1.0.0"
    assert cat.get("demo@1.1.0-dev").version == "1.1.0-dev"
    (summary,) = cat.summaries()
    assert summary.version == "1.0.0"
    assert summary.versions == ["0.9.0", "1.0.0", "1.0.1-rc.1", "1.1.0-dev"]
    assert summary.dev_versions == ["1.0.1-rc.1", "1.1.0-dev"]


async def _run(client: mcp.Client, service: str) -> dict[str, Any]:
    entry = structured(await client.call_tool("submit_job", {"service": service}))
    done = structured(
        await client.call_tool("wait_entry", {"entry_id": entry["id"], "timeout_seconds": 30})
    )["entry"]
    assert done["state"] == "succeeded", done
    logs = structured(await client.call_tool("read_logs", {"entry_id": entry["id"]}))
    return {"version": done["version"], "log": logs["data"]}


async def test_versions_side_by_side_over_mcp(tmp_path: Path, catalogue_dir: Path) -> None:
    async with (
        run_http_server(tmp_path / "home", settings={"catalogue_dirs": [catalogue_dir]}) as http,
        sdk_client(http.mcp_url, http.token("alice")) as client,
    ):
        services = structured(await client.call_tool("list_services", {}))["services"]
        (demo,) = [s for s in services if s["name"] == "demo"]
        assert demo["version"] == "1.0.0"
        assert demo["versions"] == ["0.9.0", "1.0.0", "1.0.1-rc.1", "1.1.0-dev"]
        assert demo["dev_versions"] == ["1.0.1-rc.1", "1.1.0-dev"]

        default = await _run(client, "demo")
        assert default["version"] == "1.0.0" and "ran demo 1.0.0" in default["log"]
        dev = await _run(client, "demo@1.1.0-dev")
        assert dev["version"] == "1.1.0-dev" and "ran demo 1.1.0-dev" in dev["log"]
        old = await _run(client, "demo@0.9.0")
        assert old["version"] == "0.9.0" and "ran demo 0.9.0" in old["log"]

        unknown = await client.call_tool("submit_job", {"service": "demo@2.0.0"})
        text = assert_tool_error(unknown, "unknown_service", "2.0.0", "1.1.0-dev", "0.9.0")
        assert "version" in text

        async with sdk_client(http.mcp_url, http.token("bob"), mode="legacy") as legacy:
            assert legacy.protocol_version == "2025-11-25"
            services = structured(await legacy.call_tool("list_services", {}))["services"]
            assert [s["version"] for s in services if s["name"] == "demo"] == ["1.0.0"]
            dev = await _run(legacy, "demo@1.1.0-dev")
            assert dev["version"] == "1.1.0-dev" and "ran demo 1.1.0-dev" in dev["log"]
