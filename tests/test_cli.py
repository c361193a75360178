"""The `sciorch` command, run as a real subprocess (a fresh process per command, as a person runs
it) against a temporary SCIORCH_HOME with no configuration file."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.processes import cli_env

ENTRY_ID = re.compile(r"^ent-[0-9a-f]+$")


def sciorch(
    home: Path, *args: str, timeout: float = 60, principal: str = "tester"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sciorch.cli", *args],
        env=cli_env(home, principal),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def user_error(proc: subprocess.CompletedProcess[str]) -> str:
    """A user error: exit 2, one red line on stderr, no traceback. Returns that line."""
    assert proc.returncode == 2, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli") / "home"


@pytest.fixture(scope="module")
def finished_job(home: Path) -> tuple[str, subprocess.CompletedProcess[str]]:
    proc = ok(
        sciorch(
            home,
            "submit",
            "sim-instrument",
            "-p",
            "x1=1",
            "-p",
            "x2=2.5",
            "-p",
            "duration_s=0.2",
            "--wait",
        )
    )
    entry_id = proc.stdout.splitlines()[0].strip()
    assert ENTRY_ID.match(entry_id), proc.stdout
    return entry_id, proc


def test_services_lists_the_builtin_templates(home: Path) -> None:
    out = ok(sciorch(home, "services")).stdout
    assert re.search(r"sim-instrument\s+1\.0\.0\s+job", out), out
    assert re.search(r"http-app\s+1\.0\.0\s+service", out), out


def test_sites_lists_local(home: Path) -> None:
    out = ok(sciorch(home, "sites")).stdout
    assert re.search(r"local\s+local\s+up", out), out


def test_submit_wait_prints_the_result(
    finished_job: tuple[str, subprocess.CompletedProcess[str]],
) -> None:
    _, proc = finished_job
    result = json.loads(proc.stdout.split("\n", 1)[1])
    assert isinstance(result["value"], float)
    assert result["point"] == {"x1": 1.0, "x2": 2.5}
    assert "succeeded" in proc.stderr
    assert "partial_value" in proc.stderr  # streamed records arrive while it waits


def test_unknown_service_lists_the_known_ones(home: Path) -> None:
    line = user_error(sciorch(home, "submit", "no-such-thing", "-p", "x1=1"))
    assert "no-such-thing" in line and "sim-instrument" in line and "http-app" in line
    assert "service" in line


def test_bad_parameter_names_the_field(home: Path) -> None:
    line = user_error(sciorch(home, "submit", "sim-instrument", "-p", "x1=abc"))
    assert "parameters.x1" in line
    line = user_error(sciorch(home, "submit", "sim-instrument", "-p", "colour=1"))
    assert "parameters.colour" in line and "x1" in line  # names the known ones
    line = user_error(sciorch(home, "submit", "sim-instrument", "--params-json", "[1]"))
    assert "JSON object" in line
    line = user_error(sciorch(home, "submit", "sim-instrument", "--gpus", "-1"))
    assert "gpus" in line


def test_launch_refuses_a_job(home: Path) -> None:
    line = user_error(sciorch(home, "launch", "sim-instrument"))
    assert "submit_job" in line or "job" in line


def test_status_of_one_entry_and_the_list(
    home: Path, finished_job: tuple[str, subprocess.CompletedProcess[str]]
) -> None:
    entry_id, _ = finished_job
    out = ok(sciorch(home, "status", entry_id)).stdout
    assert re.search(r"state\s+succeeded", out), out
    assert "transitions" in out and "pending" in out and "running" in out
    out = ok(sciorch(home, "status")).stdout
    assert entry_id in out and "succeeded" in out and "value=" in out


def test_unknown_entry_is_a_user_error(home: Path) -> None:
    line = user_error(sciorch(home, "status", "ent-000000000000"))
    assert "ent-000000000000" in line and "entry_id" in line


def test_logs_and_results(
    home: Path, finished_job: tuple[str, subprocess.CompletedProcess[str]]
) -> None:
    entry_id, _ = finished_job
    out = ok(sciorch(home, "logs", entry_id)).stdout
    assert "[sim-instrument]" in out and "surface=branin" in out
    data = json.loads(ok(sciorch(home, "results", entry_id)).stdout)
    assert data["state"] == "succeeded"
    assert isinstance(data["result"]["value"], float)
    assert len(data["records"]) == 3


def test_logs_follow_a_job_submitted_by_another_process(home: Path) -> None:
    """`submit` returns at once; a later process re-adopts the entry and follows its log."""
    proc = ok(sciorch(home, "submit", "sim-instrument", "-p", "duration_s=1", "-p", "records=4"))
    entry_id = proc.stdout.strip()
    assert ENTRY_ID.match(entry_id), proc.stdout
    out = ok(sciorch(home, "logs", entry_id, "-f", timeout=30)).stdout
    assert "step 4/4" in out, out
    assert "succeeded" in ok(sciorch(home, "status", entry_id)).stdout


def test_events_share_and_stop(home: Path) -> None:
    event_id = ok(sciorch(home, "create-event", "--name", "beamtime")).stdout.strip()
    assert event_id.startswith("evt-")
    out = ok(sciorch(home, "share", event_id, "bob", "--role", "operator")).stdout
    assert "bob=operator" in out
    out = ok(sciorch(home, "events")).stdout
    assert event_id in out and "beamtime" in out and "bob (operator)" in out
    line = user_error(sciorch(home, "share", event_id, "bob", "--role", "admin"))
    assert "role" in line
    launched = ok(sciorch(home, "launch", "http-app", "--event", event_id, "--wait"))
    service_id = launched.stdout.splitlines()[0].strip()
    assert "ready" in launched.stderr and f"/entries/{service_id}/?token=" in launched.stdout
    out = ok(sciorch(home, "stop-event", event_id)).stdout
    assert "stopped" in out
    # Stopped on purpose, and recorded so, although the next process is the one that looks.
    assert re.search(r"state\s+cancelled", ok(sciorch(home, "status", service_id)).stdout)
    assert event_id not in ok(sciorch(home, "events")).stdout


def test_serve_unknown_transport_is_a_user_error(home: Path) -> None:
    line = user_error(sciorch(home, "serve", "--transport", "carrier-pigeon"))
    assert "transport" in line and "stdio" in line


def test_token_create_rejects_unknown_scopes(home: Path) -> None:
    line = user_error(sciorch(home, "token", "create", "--sub", "alice", "--scopes", "root"))
    assert "scopes" in line and "read" in line


def test_demo(tmp_path: Path) -> None:
    """The demo is a real campaign: gpCAM steering sim-instrument jobs on Branin."""
    proc = ok(
        sciorch(tmp_path / "demo-home", "demo", "--evaluations", "9", "--no-progress", timeout=120)
    )
    out = proc.stdout
    assert re.search(r"state\s+completed: evaluation budget spent", out), out
    assert re.search(r"evaluations\s+9 measured, 0 failed", out), out
    best = re.search(
        r"^best\s+(\S+) at x1=\S+, x2=\S+ \(evaluation \d+, entry ent-[0-9a-f]+\)", out, re.M
    )
    assert best and 0 < float(best.group(1)) < 400, out  # Branin's range on its domain
    assert re.search(r"known optimum\s+0\.397887 \(gap ", out), out
    plots = re.findall(r"^plot\s+(\S+\.png)$", out, re.M)
    assert len(plots) == 2 and all(Path(p).stat().st_size > 0 for p in plots), out


def test_sweep_runs_a_grid_and_reports_each_element(home: Path) -> None:
    proc = ok(sciorch(
        home, "sweep", "sim-instrument", "-g", "x1=1,2", "-g", "x2=0.5",
        "-p", "duration_s=0.05", "-p", "records=1", "--throttle", "1", "--wait",
    ))
    sweep_id = proc.stdout.splitlines()[0].strip()
    assert sweep_id.startswith("swp-"), proc.stdout
    assert "2 succeeded" in proc.stderr
    status = ok(sciorch(home, "sweep-status", sweep_id)).stdout
    assert status.count("succeeded") == 2, status
    line = user_error(sciorch(home, "sweep", "sim-instrument", "-g", "x1=1,abc"))
    assert "grid[1].x1" in line


def test_urgent_is_refused_without_the_policy(home: Path) -> None:
    line = user_error(sciorch(home, "submit", "sim-instrument", "-p", "x1=1", "--urgent"))
    assert "urgent" in line and "priority" in line
