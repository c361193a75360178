"""Each user's work runs as that user (issue 13): a site maps a principal to its account (a
table, a function, a token claim), refuses a principal it cannot map (naming the site and the
principal), and runs the work as the account: real POSIX users alice and bob (made by
scripts/slurm-setup.sh), real processes on the local site, real Slurm jobs (sacct shows the
user), Kubernetes calls with impersonation headers that the emulator's RBAC checks, and list_sites
telling each caller what it would run as. Needs root (to switch users) and the test users; under
CI=true their absence fails."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from ground.accounts import AccountMap, account_for
from ground.errors import AccountNotMapped, InvalidInput
from ground.models import EntryState, Principal
from orchestrator.engine import Engine
from tests.conftest import make_settings, shutdown

REPO = Path(__file__).resolve().parents[1]
USERS = ("alice", "bob")

WHOAMI = """
name: whoami
kind: job
description: says who it runs as; tries to read a file; sleeps
command:
  - sh
  - -c
  - >-
    echo "secret of $(id -un)" > "$SCIORCH_WORKDIR/secret";
    if [ -z "$1" ]; then r=null; elif cat "$1" >/dev/null 2>&1; then r=true; else r=false; fi;
    sleep "$2";
    printf '{{"user": "%s", "home": "%s", "read_other": %s}}' "$(id -un)" "$HOME" "$r"
    > "$SCIORCH_RESULT"
  - whoami
  - "{read}"
  - "{seconds}"
parameters:
  type: object
  additionalProperties: false
  properties:
    read: {type: string, default: ""}
    seconds: {type: number, default: 0}
resources: {cpus: 1, memory: 64Mi, walltime: 120}
"""


PLUS = r"""
name: plus
kind: job
description: x1 + x2, as the job's user
command:
  - sh
  - -c
  - |-
    awk -v a="$1" -v b="$2" 'BEGIN {{ printf "{{\"value\": %.12g}}", a + b }}' > "$SCIORCH_RESULT"
  - plus
  - "{x1}"
  - "{x2}"
parameters:
  type: object
  additionalProperties: false
  properties: {x1: {type: number}, x2: {type: number}}
resources: {cpus: 1, memory: 64Mi, walltime: 60}
"""


def need_users() -> None:
    """Root and the test users alice and bob: skip without, fail under CI=true."""
    why = None
    if os.geteuid() != 0:
        why = "switching to another user needs root"
    else:
        for user in USERS:
            try:
                pwd.getpwnam(user)
            except KeyError:
                why = f"no user {user} (scripts/slurm-setup.sh creates alice and bob)"
    if why is not None:
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail(f"CI=true and {why}")
        pytest.skip(why)


@pytest.fixture
def open_home() -> Iterator[Path]:
    """A sciorch home that other users can pass through (pytest's tmp dirs are 0700 and root's:
    no entry of alice could reach its work dir there)."""
    base = Path(tempfile.mkdtemp(prefix="sciorch-accounts-"))
    base.chmod(0o711)
    try:
        yield base / "home"
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def catalogue(tmp_path: Path) -> Path:
    cat = tmp_path / "catalogue"
    cat.mkdir()
    (cat / "whoami.yaml").write_text(WHOAMI)
    return cat


def local_site(**accounts: Any) -> dict[str, Any]:
    return {
        "name": "local",
        "kind": "local",
        "cpus": 4,
        "memory_mb": 4096,
        "term_grace_s": 1,
        "accounts": {"table": {"alice": "alice", "bob": "bob"}, **accounts},
    }


@contextlib.asynccontextmanager
async def engine_on(home: Path, catalogue: Path, *sites: dict[str, Any]) -> AsyncIterator[Engine]:
    eng = await Engine.open(make_settings(home, sites=list(sites), catalogue_dirs=[catalogue]))
    try:
        yield eng
    finally:
        await shutdown(eng)


def owner_of_process(pid: int) -> str:
    """The user `ps` shows for a process."""
    out = subprocess.run(["ps", "-o", "user=", "-p", str(pid)], capture_output=True, text=True)
    return out.stdout.strip()


async def until_file(path: Path, limit_s: float = 20.0) -> None:
    for _ in range(int(limit_s * 20)):
        if await asyncio.to_thread(path.exists):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{path} did not appear within {limit_s}s")


# ------------------------------------------------------------------ the mapping


def lookup(principal: Principal, site: str) -> str | None:
    """An `accounts.function` for the tests: the part of an e-mail principal before the @."""
    return principal.id.split("@")[0] if principal.id.endswith("@lab.example.org") else None


def test_a_site_maps_by_table_then_function_then_claim() -> None:
    mapping = AccountMap(
        table={"root-of-all": "alice"},
        function="tests.test_accounts:lookup",
        claim="preferred_username",
    )
    by_claim = Principal(id="0f3a-77", claims=(("preferred_username", "bob"),))
    assert account_for(mapping, "hpc", Principal(id="root-of-all")) == "alice"
    assert account_for(mapping, "hpc", Principal(id="carol@lab.example.org")) == "carol"
    assert account_for(mapping, "hpc", by_claim) == "bob"
    assert account_for(None, "hpc", Principal(id="anyone")) is None  # the embedded default
    with pytest.raises(AccountNotMapped) as refused:
        account_for(mapping, "hpc", Principal(id="mallory"))
    assert "'mallory'" in refused.value.message and "'hpc'" in refused.value.message
    assert refused.value.details == {"site": "hpc", "principal": "mallory"}
    assert refused.value.field == "site"
    # a claim that is no account name is refused too, not passed on to a scheduler
    odd = Principal(id="x", claims=(("preferred_username", "Bob Smith; rm -rf"),))
    with pytest.raises(AccountNotMapped, match="not an account name"):
        account_for(mapping, "hpc", odd)
    # only an explicit `required = false` lets an unmapped principal run as the server's user
    lax = AccountMap(table={"a": "alice"}, required=False)
    assert account_for(lax, "hpc", Principal(id="mallory")) is None
    with pytest.raises(InvalidInput, match=r"accounts\.function"):
        account_for(AccountMap(function="tests.nothing_here:f"), "hpc", Principal(id="a"))


def test_the_accounts_table_is_checked_with_the_configuration(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput) as bad:
        make_settings(tmp_path, sites=[{"name": "x", "kind": "local", "accounts": {"tabel": {}}}])
    assert bad.value.field == "sites.0.accounts.tabel"


# ------------------------------------------------------------------ the local site


async def test_local_entries_run_as_their_users_in_closed_work_dirs(
    open_home: Path, catalogue: Path
) -> None:
    need_users()
    alice, bob = Principal(id="alice"), Principal(id="bob")
    async with engine_on(open_home, catalogue, local_site()) as eng:
        a = await eng.launch(alice, "whoami", {"seconds": 8})
        assert a.handle["account"] == "alice"
        workdir = Path(eng.settings.entries_dir / a.id)
        await until_file(workdir / "secret")
        running = await eng.get_entry(alice, a.id)
        assert owner_of_process(running.handle["pid"]) == "alice"
        st = await asyncio.to_thread(workdir.stat)
        assert (pwd.getpwuid(st.st_uid).pw_name, stat.S_IMODE(st.st_mode)) == ("alice", 0o700)

        b = await eng.launch(bob, "whoami", {"read": str(workdir / "secret")})
        b_done, _ = await eng.wait_entry(bob, b.id, timeout_s=30)
        assert b_done.state == EntryState.SUCCEEDED, b_done.reason
        assert b_done.result == {"user": "bob", "home": "/home/bob", "read_other": False}
        a_done, _ = await eng.wait_entry(alice, a.id, timeout_s=30)
        assert a_done.state == EntryState.SUCCEEDED, a_done.reason
        assert a_done.result == {"user": "alice", "home": "/home/alice", "read_other": None}
        # sciorch (root) still reads what alice's entry wrote
        assert (await eng.read_logs(alice, a.id)).size >= 0

        with pytest.raises(AccountNotMapped) as refused:
            await eng.launch(Principal(id="carol"), "whoami", {})
        assert "'carol'" in refused.value.message and "'local'" in refused.value.message


async def test_a_restarted_server_keeps_running_the_entry_as_its_user(
    open_home: Path, catalogue: Path
) -> None:
    need_users()
    alice = Principal(id="alice")
    async with engine_on(open_home, catalogue, local_site()) as eng:
        a = await eng.launch(alice, "whoami", {"seconds": 2})
        await until_file(Path(eng.settings.entries_dir / a.id / "secret"))
        spec = await eng.store.get_spec(a.id)
        assert spec["account"] == "alice"
        await eng.close()
    async with engine_on(open_home, catalogue, local_site()) as eng:
        done, _ = await eng.wait_entry(alice, a.id, timeout_s=30)
        assert done.state == EntryState.SUCCEEDED, done.reason
        assert done.result is not None and done.result["user"] == "alice"


def test_without_root_another_account_is_refused_clearly() -> None:
    """The server run as an ordinary user (sciorch's Slurm job user) cannot start alice's work,
    and says so instead of running it as itself."""
    need_users()
    code = (
        "from backends.posix_users import run_as\n"
        "from ground.errors import NotAllowed\n"
        "try:\n    run_as('local', 'alice')\n"
        "except NotAllowed as e:\n    print(e.text())\n"
    )
    user = os.environ.get("SCIORCH_SLURM_USER", "sciorch")
    out = subprocess.run(
        ["runuser", "-u", user, "--", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert "not_allowed: site 'local' runs this work as 'alice'" in out.stdout, out
    assert f"sciorch runs as '{user}', not root" in out.stdout


async def test_list_sites_tells_each_caller_its_account(open_home: Path, catalogue: Path) -> None:
    from tools.operations import list_sites

    other = {"name": "shared", "kind": "local", "cpus": 1, "memory_mb": 512}
    async with engine_on(open_home, catalogue, local_site(), other) as eng:
        mine = {s.name: s for s in (await list_sites(eng, Principal(id="alice"))).sites}
        assert mine["local"].account == "alice" and mine["local"].account_note is None
        assert mine["shared"].account is None
        assert mine["shared"].account_note == "runs as the server's own user"
        carols = {s.name: s for s in (await list_sites(eng, Principal(id="carol"))).sites}
        assert carols["local"].account is None
        assert "'carol' has no account on site 'local'" in (carols["local"].account_note or "")
        # and carol's work goes where she may run, not to the site that would refuse her
        entry = await eng.launch(Principal(id="carol"), "whoami", {})
        assert entry.site == "shared" and "account" not in entry.handle


# ------------------------------------------------------------------ Slurm


def users_running(entry_id: str) -> set[str]:
    """Who `ps` says runs the processes of an entry (those with its SCIORCH_ENTRY_ID)."""
    mark = f"SCIORCH_ENTRY_ID={entry_id}".encode()
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError):
                if mark in Path(f"/proc/{name}/environ").read_bytes().split(b"\0"):
                    pids.append(int(name))
    return {owner_of_process(pid) for pid in pids} - {""}


def sacct_user(job_id: str) -> str:
    out = subprocess.run(
        ["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "User"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return out.stdout.strip()


@pytest.fixture
def slurm_shared() -> Iterator[Path]:
    from tests.test_slurm import UNAVAILABLE, cancel_jobs_under

    need_users()
    if UNAVAILABLE is not None:
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail(f"CI=true and no Slurm: {UNAVAILABLE}")
        pytest.skip(UNAVAILABLE)
    shared = Path(os.environ["SCIORCH_SLURM_SHARED_DIR"]) / f"accounts-{os.urandom(5).hex()}"
    try:
        yield shared
    finally:
        cancel_jobs_under(shared)


@pytest.mark.parametrize("transport", ["rest", "cli"])
async def test_slurm_jobs_run_and_are_accounted_as_their_users(
    transport: str, slurm_shared: Path, open_home: Path, catalogue: Path
) -> None:
    from tests.test_slurm import slurm_site
    from tools.operations import list_sites

    site = {
        **slurm_site("hpc", transport, slurm_shared),
        "accounts": {"table": {"alice": "alice", "bob": "bob"}},
    }
    alice, bob = Principal(id="alice"), Principal(id="bob")
    async with engine_on(open_home, catalogue, site) as eng:
        a = await eng.launch(alice, "whoami", {"seconds": 4})
        workdir = slurm_shared / a.id
        await until_file(workdir / "secret", 60)
        assert users_running(a.id) == {"alice"}
        st = await asyncio.to_thread(workdir.stat)
        assert (pwd.getpwuid(st.st_uid).pw_name, stat.S_IMODE(st.st_mode)) == ("alice", 0o700)

        b = await eng.launch(bob, "whoami", {"read": str(workdir / "secret")})
        b_done, _ = await eng.wait_entry(bob, b.id, timeout_s=60)
        assert b_done.state == EntryState.SUCCEEDED, b_done.reason
        assert b_done.result == {"user": "bob", "home": "/home/bob", "read_other": False}
        a_done, _ = await eng.wait_entry(alice, a.id, timeout_s=60)
        assert a_done.state == EntryState.SUCCEEDED, a_done.reason
        assert a_done.result == {"user": "alice", "home": "/home/alice", "read_other": None}
        assert a_done.handle["user"] == "alice"

        for entry, user in ((a_done, "alice"), (b_done, "bob")):
            job_id = str(entry.handle["job_id"])
            for _ in range(100):  # slurmctld hands the record to slurmdbd a moment later
                if sacct_user(job_id):
                    break
                await asyncio.sleep(0.1)
            assert sacct_user(job_id) == user

        sites = {s.name: s for s in (await list_sites(eng, alice)).sites}
        mine = sites["hpc"]
        assert mine.account == "alice"
        assert mine.association is not None
        assert mine.association.account == "sciorch"
        assert mine.association.limits["max_jobs"] == "20"
        assert "fairshare" in mine.association.usage

        # cancelling goes through as alice too (sciorch's own Slurm user may not touch her job)
        c = await eng.launch(alice, "whoami", {"seconds": 60})
        await until_file(slurm_shared / c.id / "secret", 60)
        await eng.cancel(alice, c.id)
        c_done, _ = await eng.wait_entry(alice, c.id, timeout_s=30)
        assert c_done.state == EntryState.CANCELLED, c_done.reason

        with pytest.raises(AccountNotMapped) as refused:
            await eng.launch(Principal(id="carol"), "whoami", {}, site="hpc")
        assert "'carol'" in refused.value.message and "'hpc'" in refused.value.message


# ------------------------------------------------------------------ Kubernetes


async def test_kubernetes_calls_for_an_entry_impersonate_its_user(
    tmp_path: Path, catalogue: Path
) -> None:
    """Every call sciorch makes for alice's entry carries Impersonate-User: alice (and the
    site's groups); the emulator's RBAC lets alice work in the cluster and refuses bob, as a
    real API server would, and sciorch passes the refusal on naming the user."""
    from backends.kubernetes import KubernetesBackend
    from ground.errors import BackendError
    from tests.fakes.kube_emulator import KubeEmulator
    from tests.test_backend_contract import JOB_BODY

    (catalogue / "kjob.yaml").write_text("name: kjob" + JOB_BODY)
    async with KubeEmulator() as emu:
        emu.add_node("node-1", cpu="16", memory="64Gi")
        emu.allow("alice", "create,get,list,delete", "namespaces,configmaps,jobs,pods,pods/log")
        site = {
            "name": "spin",
            "kind": "kubernetes",
            "host": emu.url,
            "impersonate": True,
            "impersonate_groups": ["sciorch-users", "lab"],
            "accounts": {"claim": "preferred_username"},
        }
        alice = Principal(id="a-0001", claims=(("preferred_username", "alice"),))
        bob = Principal(id="b-0002", claims=(("preferred_username", "bob"),))
        async with engine_on(tmp_path / "home", catalogue, site) as eng:
            assert isinstance(eng.backends["spin"], KubernetesBackend)
            entry = await eng.launch(alice, "kjob", {"records": 1})
            ns = f"sciorch-{entry.event_id}"
            await emu.wait_object("jobs", ns, entry.id)
            pod = emu.create_pod(ns, "jobs", entry.id)
            emu.schedule(ns, pod)
            await emu.kubelet_run(ns, pod)
            done, _ = await eng.wait_entry(alice, entry.id, timeout_s=30)
            assert done.state == EntryState.SUCCEEDED, done.reason
            assert done.result == {"value": 42}

            acting = [(m, p, u, g) for m, p, u, g in emu.identities if u is not None]
            writes = [(m, p) for m, p, _, _ in acting if m in ("POST", "DELETE")]
            assert ("POST", "/api/v1/namespaces") in writes
            assert any(p.endswith("/jobs") for m, p in writes if m == "POST")
            assert {(u, g) for _, _, u, g in acting} == {("alice", ("sciorch-users", "lab"))}
            assert any(p.endswith(f"/pods/{pod}/log") for _, p, _, _ in acting)
            # nothing was created as sciorch's own account
            own = [(m, p) for m, p, u, _ in emu.identities if u is None and m == "POST"]
            assert own == []

            with pytest.raises(BackendError) as refused:
                await eng.launch(bob, "kjob", {"records": 1})
            assert 'User "bob" cannot create' in refused.value.message
            assert "user 'bob' (impersonated for this entry)" in refused.value.message


# ------------------------------------------------------------------ through MCP, with the IdP


async def test_idp_users_run_as_their_accounts_through_mcp(
    open_home: Path, catalogue: Path
) -> None:
    """The official SDK client logs alice and bob in at the real IdP and submits over
    streamable HTTP; the site maps each by a claim of the access token the verifier put on the
    principal, so each job runs as its user; a site with no account for bob refuses him by
    name, and list_sites tells him so."""
    from tests.mcp_helpers import assert_tool_error, structured, wait_entry
    from tests.oauth_helpers import oauth_client, run_oauth_server

    need_users()
    sites = [
        {
            "name": "local",
            "kind": "local",
            "cpus": 4,
            "memory_mb": 4096,
            "accounts": {"claim": "sub"},
        },
        {
            "name": "lab",
            "kind": "local",
            "cpus": 1,
            "memory_mb": 1024,
            "accounts": {"table": {"alice": "alice"}},
        },
    ]
    settings = {"sites": sites, "catalogue_dirs": [catalogue]}
    async with run_oauth_server(open_home, settings) as server:
        for user in USERS:
            async with oauth_client(server.mcp_url, user) as (client, _, _):
                args = {"service": "whoami", "parameters": {}, "site": "local"}
                entry = structured(await client.call_tool("submit_job", args))
                done = await wait_entry(client, entry["id"], 60)
                assert done["entry"]["state"] == "succeeded", done
                got = structured(await client.call_tool("read_results", {"entry_id": entry["id"]}))
                assert got["result"]["user"] == user, got
                if user == "bob":
                    refused = await client.call_tool(
                        "submit_job", {"service": "whoami", "parameters": {}, "site": "lab"}
                    )
                    assert_tool_error(refused, "account_not_mapped", "'bob'", "site 'lab'")
                    listed = structured(await client.call_tool("list_sites", {}))
                    by_name = {s["name"]: s for s in listed["sites"]}
                    assert by_name["local"]["account"] == "bob"
                    assert by_name["lab"]["account"] is None
                    assert "'bob' has no account on site 'lab'" in by_name["lab"]["account_note"]


async def test_slurm_cli_submits_through_runuser_where_sbatch_has_no_uid(
    slurm_shared: Path, open_home: Path, catalogue: Path
) -> None:
    """Newer sbatch may lack --uid: the CLI transport then runs sbatch as the user (runuser),
    and the job is still the user's in sacct."""
    from backends.slurm import SlurmBackend
    from backends.slurm_cli import CliTransport
    from tests.test_slurm import slurm_site

    site = {**slurm_site("hpc", "cli", slurm_shared), "accounts": {"table": {"bob": "bob"}}}
    bob = Principal(id="bob")
    async with engine_on(open_home, catalogue, site) as eng:
        backend = eng.backends["hpc"]
        assert isinstance(backend, SlurmBackend) and isinstance(backend.transport, CliTransport)
        backend.transport._sbatch_uid = False  # as if `sbatch --help` had no --uid
        entry = await eng.launch(bob, "whoami", {})
        done, _ = await eng.wait_entry(bob, entry.id, timeout_s=60)
        assert done.state == EntryState.SUCCEEDED, done.reason
        assert done.result is not None and done.result["user"] == "bob"
        job_id = str(done.handle["job_id"])
        for _ in range(100):
            if sacct_user(job_id):
                break
            await asyncio.sleep(0.1)
        assert sacct_user(job_id) == "bob"


async def test_a_flow_s_steps_run_as_the_account_its_owner_s_claim_maps_to(
    open_home: Path, catalogue: Path
) -> None:
    """A flow run keeps its owner's token claims (stored with the run, as with a trigger), so
    its steps map to the same account as the owner's own jobs."""
    from flows.manager import flow_manager
    from flows.models import StartFlowInput

    need_users()
    site = {**local_site(), "accounts": {"claim": "preferred_username"}}
    owner = Principal(id="b-0002", claims=(("preferred_username", "bob"),))
    flow = {
        "name": "who",
        "steps": {
            "first": {"service": "whoami"},
            "second": {"service": "whoami", "needs": ["first"]},
        },
        "outputs": {"users": ["{steps.first.result.user}", "{steps.second.result.user}"]},
    }
    async with engine_on(open_home, catalogue, site) as eng:
        mgr = flow_manager(eng)
        async with mgr.serving():
            run = await mgr.start(owner, StartFlowInput(flow=flow))
            for _ in range(600):
                view = await mgr.view(run.run_id)
                if view.state.terminal:
                    break
                await asyncio.sleep(0.05)
        await mgr.shutdown()
    assert view.state == "succeeded", view.reason
    assert view.outputs == {"users": ["bob", "bob"]}


async def test_a_campaign_s_jobs_run_as_the_account_its_owner_s_claim_maps_to(
    open_home: Path, catalogue: Path
) -> None:
    """A campaign keeps its owner's token claims (stored with it): the jobs its runner submits
    through the in-process server map to the owner's account on a site that maps by claim."""
    import tomllib

    from mcp_server.steering_tools import campaign_manager
    from steering.spec import CampaignSpec
    from tests.test_steering import CAMPAIGN_TOML

    need_users()
    # A job the test users can run (not this checkout's Python): the value is x1 + x2.
    (catalogue / "plus.yaml").write_text(PLUS)
    site = {**local_site(), "accounts": {"claim": "preferred_username"}}
    owner = Principal(id="b-0002", claims=(("preferred_username", "bob"),))
    toml = CAMPAIGN_TOML.format(duration=0, budget=3)
    toml = toml.replace('service = "sim-instrument"', 'service = "plus"').replace(
        'parameters = { surface = "branin", duration_s = 0, records = 1 }', "parameters = {}"
    )
    spec = CampaignSpec.model_validate(tomllib.loads(toml))
    async with engine_on(open_home, catalogue, site) as eng:
        mgr = campaign_manager(eng)
        try:
            view = await mgr.start(owner, spec)
            await asyncio.wait_for(mgr.wait(view.id), 120)
            done = await mgr.get(owner, view.id)
            entries, _ = await eng.list_entries(owner, limit=100)
        finally:
            await mgr.shutdown()
    assert done.state == "completed", done.reason
    assert len(entries) == 3 and {e.handle.get("account") for e in entries} == {"bob"}


async def test_a_slurm_sweep_runs_as_its_submitters_account(
    slurm_shared: Path, open_home: Path, catalogue: Path
) -> None:
    """One job array for the sweep, submitted as the principal's account (not the site's
    user): each element says it ran as alice, and so does sacct."""
    from orchestrator import sweeps
    from tests.test_slurm import slurm_site

    site = {**slurm_site("hpc", "cli", slurm_shared), "accounts": {"table": {"alice": "alice"}}}
    alice = Principal(id="alice")
    async with engine_on(open_home, catalogue, site) as eng:
        sweep = await sweeps.submit_sweep(eng, alice, "whoami", grid={"seconds": [0, 0.1, 0.2]})
        done, timed_out = await sweeps.wait_sweep(eng, alice, sweep.id, timeout_s=90)
        assert not timed_out and done.counts == {"succeeded": 3}, [e.reason for e in done.entries]
        assert [(e.result or {}).get("user") for e in done.entries] == ["alice"] * 3
        job_ids = [str(e.handle["job_id"]) for e in done.entries]
        array_id = job_ids[0].split("_")[0]
        assert job_ids == [f"{array_id}_{i}" for i in range(3)]
        for _ in range(100):  # slurmctld hands the record to slurmdbd a moment later
            if sacct_user(array_id):
                break
            await asyncio.sleep(0.1)
        assert set(sacct_user(array_id).split()) == {"alice"}
