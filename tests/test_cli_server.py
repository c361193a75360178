"""The `sciorch` command while `sciorch serve` runs on the same home: every command acts through
the server (its MCP endpoint, a token the command signs with the home's key) and prints what it
prints with no server; a discovery file left by a killed server, or describing another home's
server, is noticed and the command works in its own process. Real processes throughout: the
server and each command are children, as a person runs them in two terminals."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2
import pytest

from sciorch.web.discovery import DISCOVERY_FILE, read_discovery
from tests.mcp_helpers import free_socket
from tests.processes import cli_env, serving
from tests.test_cli import ENTRY_ID, ok, sciorch, user_error

FALLBACK = "working in this process instead"
SLOW = 180.0  # one command, on a loaded two-core machine


@dataclass
class Served:
    home: Path
    base: str
    child: subprocess.Popen[str]


@contextlib.contextmanager
def serve(home: Path) -> Iterator[Served]:
    """`sciorch serve` on `home` in a child process, on a free port; stopped after."""
    home.mkdir(parents=True, exist_ok=True)
    with free_socket() as sock:  # a free port; closed so that the server can bind it
        port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "sciorch.cli", "serve", "--port", str(port)]
    with (home.parent / f"{home.name}-serve.log").open("a") as log:
        with serving(
            argv, base, what="sciorch serve", env=cli_env(home), stdout=log,
            stderr=subprocess.STDOUT,
        ) as child:  # fmt: skip
            yield Served(home, base, child)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serve(tmp_path_factory.mktemp("served") / "home") as served:
        yield served


@pytest.fixture(scope="module")
def alone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home no server runs on."""
    return tmp_path_factory.mktemp("alone") / "home"


def audited_tools(home: Path) -> list[str]:
    """The tools the server's audit log recorded (mutating calls through MCP only)."""
    path = home / "logs" / "audit.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["tool"] for line in path.read_text().splitlines() if line]


# Values that differ from one run to the next, whatever runs it (the backend handle's pids,
# times and paths: the whole row, which wraps where its values' lengths say).
_VARIES = [
    (re.compile(r"^handle .*\n(^ {6,}\S.*\n)*", re.M), "HANDLE\n"),
    (re.compile(r"ent-[0-9a-f]+"), "ENT"),
    (re.compile(r"evt-[0-9a-f]+"), "EVT"),
    (re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(\.\d+)?(\+00:00|Z)?"), "TIME"),
    (re.compile(r"\b\d+\.\ds\b"), "SECONDS"),
    (re.compile(r'"elapsed_s": [0-9.]+'), '"elapsed_s": N'),
]


def normalised(text: str) -> str:
    for pattern, replacement in _VARIES:
        text = pattern.sub(replacement, text)
    return text


_transcripts: dict[str, list[str]] = {}


def transcript(mode: str, home: Path) -> list[str]:
    """One session of commands, as a person types them, with what each printed on stdout (and
    the red line of a refused one); computed once per mode."""
    if mode in _transcripts:
        return _transcripts[mode]
    said: list[str] = []

    def run(*args: str, who: str = "tester", refused: bool = False) -> str:
        proc = sciorch(home, *args, timeout=SLOW, principal=who)
        if refused:
            said.append(f"{who}$ {' '.join(args)}\n{user_error(proc)}")
            return ""
        ok(proc)
        assert FALLBACK not in proc.stderr, proc.stderr
        said.append(f"{who}$ {' '.join(args)}\n{proc.stdout}")
        return proc.stdout

    event = run("create-event", "--name", "beamtime").strip()
    assert event.startswith("evt-")
    submitted = run(
        "submit", "sim-instrument", "--event", event, "-p", "x1=1", "-p", "x2=2.5",
        "-p", "duration_s=0.3", "-p", "noise_std=0", "-p", "records=3", "--wait",
    )  # fmt: skip
    entry = submitted.splitlines()[0].strip()
    assert ENTRY_ID.match(entry), submitted
    run("status", entry)
    run("results", entry)
    run("logs", entry)
    run("share", event, "bob", "--role", "viewer")
    run("events")
    run("status", entry, who="bob")  # a viewer sees it
    run("cancel", entry, who="bob", refused=True)  # and may not cancel it
    run("status", entry, who="carol", refused=True)  # nobody else sees it at all
    run("stop-event", event)
    _transcripts[mode] = said
    return said


@pytest.mark.timeout(900)  # a dozen commands, each a fresh process
@pytest.mark.parametrize("mode", ["in-process", "server"])
def test_commands_act_with_and_without_a_server_running(
    mode: str, server: Served, alone: Path
) -> None:
    home = server.home if mode == "server" else alone
    said = transcript(mode, home)
    text = "\n".join(said)
    assert re.search(r"state\s+succeeded", text), text
    assert '"value": 19.34000031383735' in text and "step 3/3" in text, text
    assert "error: bob is viewer on event" in text and "this needs operator" in text, text
    assert "error: no entry" in text and "visible to carol (field: entry_id)" in text, text
    # Through the server the calls are MCP tool calls (its audit log has them); in-process
    # they are not, and no discovery file is involved.
    tools = audited_tools(home)
    if mode == "server":
        assert {"create_event", "submit_job", "share_event", "stop_event"} <= set(tools), tools
        assert "cancel_entry" in tools  # bob's, refused, is recorded too
    else:
        assert tools == [] and not (home / DISCOVERY_FILE).exists()


@pytest.mark.timeout(1800)
def test_commands_print_the_same_either_way(server: Served, alone: Path) -> None:
    here = [normalised(t) for t in transcript("in-process", alone)]
    there = [normalised(t) for t in transcript("server", server.home)]
    assert len(here) == len(there)
    for a, b in zip(here, there, strict=True):
        assert a == b


def test_submit_wait_tells_records_and_states_through_the_server(server: Served) -> None:
    proc = ok(
        sciorch(
            server.home, "submit", "sim-instrument", "-p", "duration_s=0.6", "-p", "records=4",
            "--wait", timeout=SLOW,
        )
    )  # fmt: skip
    assert FALLBACK not in proc.stderr
    records = re.findall(r"^  record (\d+): \{", proc.stderr, re.M)
    assert records == ["0", "1", "2", "3"], proc.stderr
    assert re.search(r"^  running$", proc.stderr, re.M), proc.stderr
    assert re.search(r"ent-[0-9a-f]+ succeeded", proc.stderr), proc.stderr


@pytest.mark.timeout(600)
def test_launch_http_app_wait_prints_a_url_that_answers(server: Served) -> None:
    """The issue's case: `sciorch launch http-app --wait` with `sciorch serve` running in another
    terminal prints a URL that opens the app, there and then."""
    proc = ok(
        sciorch(
            server.home, "launch", "http-app", "-p", "greeting=hi there", "--wait", timeout=SLOW
        )
    )
    entry, url = (line.strip() for line in proc.stdout.splitlines()[:2])
    assert ENTRY_ID.match(entry), proc.stdout
    assert url.startswith(f"{server.base}/entries/{entry}/?token="), proc.stdout
    assert "answers while `sciorch serve` runs" not in proc.stderr  # it does run
    with httpx2.Client(follow_redirects=True, timeout=30) as http:
        page = http.get(url)
        assert page.status_code == 200 and "<h1>hi there</h1>" in page.text, page.text
        # Not without the entry's token.
        bare = httpx2.get(f"{server.base}/entries/{entry}/", timeout=30)
        assert bare.status_code in (401, 403), bare.status_code
    out = ok(sciorch(server.home, "cancel", entry, timeout=SLOW)).stdout
    assert "cancelled" in out


@pytest.mark.timeout(600)
def test_another_homes_server_is_never_used(server: Served, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    served_events = audited_tools(server.home).count("create_event")
    # A copy of a running server's file (a home copied with cp -r): it names its own home.
    (home / DISCOVERY_FILE).write_text((server.home / DISCOVERY_FILE).read_text())
    proc = ok(sciorch(home, "create-event", "--name", "mine", timeout=SLOW))
    assert "another home" in proc.stderr and FALLBACK in proc.stderr, proc.stderr
    assert "evt-" in proc.stdout
    # One that claims this home but whose address another home's server answers: that server
    # refuses a token signed by this home's key, so it is not used either.
    found = read_discovery(server.home)
    assert found is not None
    forged = found.model_copy(update={"home": str(home.resolve())})
    (home / DISCOVERY_FILE).write_text(forged.model_dump_json())
    proc = ok(sciorch(home, "events", timeout=SLOW))
    assert "does not answer for this home" in proc.stderr and FALLBACK in proc.stderr
    assert "mine" in proc.stdout  # this home's event, not the server's
    assert not (home / DISCOVERY_FILE).exists()  # removed once this home was held
    assert audited_tools(server.home).count("create_event") == served_events


@pytest.mark.timeout(900)
def test_a_server_killed_with_9_is_noticed_and_a_clean_stop_leaves_nothing(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    with serve(home) as served:
        found = read_discovery(home)
        assert found is not None and found.pid == served.child.pid
        assert found.serves(home) and found.mcp_url == served.base + "/mcp"
        assert (home / DISCOVERY_FILE).stat().st_mode & 0o077 == 0
        event = ok(sciorch(home, "create-event", "--name", "before", timeout=SLOW)).stdout.strip()
        os.kill(served.child.pid, signal.SIGKILL)
        served.child.wait(30)
    assert (home / DISCOVERY_FILE).exists()  # nobody removed it
    proc = ok(sciorch(home, "events", timeout=SLOW))
    assert f"its process {found.pid} is gone" in proc.stderr and FALLBACK in proc.stderr
    assert event in proc.stdout
    assert not (home / DISCOVERY_FILE).exists()
    again = ok(sciorch(home, "events", timeout=SLOW))
    assert FALLBACK not in again.stderr and event in again.stdout
    # A server started again is used again, and stopped cleanly leaves no file behind.
    with serve(home) as served:
        proc = ok(sciorch(home, "stop-event", event, timeout=SLOW))
        assert "stopped" in proc.stdout and FALLBACK not in proc.stderr
        assert audited_tools(home)[-1] == "stop_event"
        served.child.terminate()
        served.child.wait(30)
    assert not (home / DISCOVERY_FILE).exists()


@pytest.mark.timeout(600)
def test_demo_drives_the_server_running_on_its_home(server: Served) -> None:
    """The campaign loop runs in the command, its measurements through the server's tools."""
    before = audited_tools(server.home).count("submit_job")
    proc = ok(
        sciorch(server.home, "demo", "--evaluations", "4", "--batch", "2", "--no-progress",
                timeout=540)
    )  # fmt: skip
    assert f"(against {server.base}/mcp)" in proc.stderr, proc.stderr
    assert re.search(r"state\s+completed: evaluation budget spent", proc.stdout), proc.stdout
    assert re.search(r"evaluations\s+4 measured, 0 failed", proc.stdout), proc.stdout
    assert audited_tools(server.home).count("submit_job") - before >= 4


@pytest.mark.timeout(600)
def test_fetch_through_the_server_copies_the_files_byte_for_byte(tmp_path: Path) -> None:
    """`fetch` reads the files over the server's download route (as they are, not decoded as
    text); another principal gets nothing."""
    from tests.test_artifacts import catalogue, sha256

    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text(f'catalogue_dirs = ["{catalogue(tmp_path)}"]\n')
    with serve(home):
        proc = ok(sciorch(home, "submit", "writes-files", "--wait", timeout=SLOW))
        assert FALLBACK not in proc.stderr
        entry = proc.stdout.splitlines()[0].strip()
        dest = tmp_path / "got"
        printed = ok(sciorch(home, "fetch", entry, "-o", str(dest), timeout=SLOW)).stdout
        out = home / "entries" / entry / "output"
        for path in ("big.bin", "data.csv", "plots/red.png"):
            assert sha256(dest / path) == sha256(out / path)
            assert sha256(out / path) in printed
        line = user_error(sciorch(home, "fetch", entry, "-o", str(tmp_path / "x"),
                                  timeout=SLOW, principal="carol"))  # fmt: skip
        assert "visible to carol" in line
        assert not (tmp_path / "x").exists()
