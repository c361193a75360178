"""The kubernetes backend.

* Manifests: every builder's output is validated with kubernetes-validate (strict, 1.33) and the
  project's own checks (RFC 1123/1035 names, whole-number GPUs with request == limit, selectors
  that match the template's labels, references between objects); the own checks are shown to
  catch what the schemas miss.
* The job wrapper runs for real under /bin/sh and its log is parsed back by the backend's mirror.
* Integration: the real engine and backend talk real HTTP to a kmock-based emulator
  (tests/fakes/kube_emulator.py) started here; the test plays the controllers and the kubelet,
  scripts logs, and injects 403/409/410/500 and dropped watches.
* Opt-in tier: with KUBECONFIG set, the same scenarios run against that cluster (its own
  controllers and kubelets do the work); without it those tests are skipped.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import kubernetes_validate
import pytest

from backends.base import HealthSpec, LaunchSpec, WorkDir
from backends.kube_log import Mirror
from backends.kube_manifests import (
    JOB_WRAPPER,
    KubernetesOptions,
    build_manifests,
    check_bundle,
    check_manifest,
    deployment_manifest,
    endpoint,
    ingress_manifest,
    job_manifest,
    namespace_manifest,
    namespace_name,
    service_manifest,
)
from backends.kube_status import parse_quantity
from backends.kubernetes import KubernetesBackend
from ground.errors import BackendError, InvalidInput, NoSiteAvailable
from ground.models import Entry, EntryState, EventState, ResourceRequest, Resources
from orchestrator.engine import Engine
from tests.conftest import ALICE, make_settings, shutdown
from tests.fakes.kube_emulator import KubeEmulator
from tests.test_backend_contract import JOB_BODY

K8S_VERSION = "1.33"
REAL = os.environ.get("KUBECONFIG")

# ============================================================================ manifests


def spec(kind: str = "job", **kw: Any) -> LaunchSpec:
    base: dict[str, Any] = {
        "entry_id": "ent-0123456789ab",
        "event_id": "evt-a1b2c3d4e5f6",
        "service": "sim-instrument",
        "kind": kind,
        "argv": ["/usr/bin/python3", "-m", "x", "--port", "{port}", "--out", "{result_file}"],
        "parameters": {"x1": 1.5, "name": "probe"},
        "env": {"MODE": "fast"},
        "resources": Resources(cpus=0.5, memory_mb=512, walltime_s=600),
        "base_path": "/entries/ent-0123456789ab/",
    }
    if kind == "service":
        base["health"] = HealthSpec(path="/health", timeout_s=30, interval_s=0.5)
        base["restart_policy"] = "on-failure"
        base["max_restarts"] = 2
    base.update(kw)
    return LaunchSpec(**base)


OPTIONS: dict[str, dict[str, Any]] = {
    "plain": {},
    "gpus": {
        "gpu_node_selectors": {"a100": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB"}},
        "gpu_tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                             "effect": "NoSchedule"}],
        "node_selector": {"kubernetes.io/os": "linux"},
        "image_pull_secrets": ["regcred"],
        "service_account": "runner",
    },
    "host-ingress": {
        "ingress_host_template": "{entry}.apps.example.org",
        "ingress_class": "nginx",
        "ingress_annotations": {"nginx.ingress.kubernetes.io/proxy-body-size": "64m"},
        "tls_secret": "apps-tls",
    },
    "path-ingress": {"ingress_host": "spin.example.org", "ingress_path_prefix": "/sci/"},
    "pvc": {"results_pvc": "sciorch-results", "cpu_limit": True, "max_walltime_s": 300},
}
RESOURCES = {
    "cpu": Resources(cpus=0.25, memory_mb=128, walltime_s=60),
    "gpu": Resources(cpus=4, memory_mb=16384, gpus=2, gpu_type="a100", walltime_s=3600),
}


def bundle(s: LaunchSpec, opts: KubernetesOptions) -> list[dict[str, Any]]:
    return [namespace_manifest(s.event_id, "spin", opts), *build_manifests(s, opts, "spin")]


@pytest.mark.parametrize(
    ("kind", "variant", "res"),
    [
        (kind, variant, res)
        for kind in ("job", "service")
        for variant in OPTIONS
        for res in RESOURCES
        if res == "cpu" or variant == "gpus"  # typed GPUs need gpu_node_selectors
    ],
)
def test_every_manifest_is_valid(kind: str, variant: str, res: str) -> None:
    opts = KubernetesOptions.model_validate(OPTIONS[variant])
    s = spec(kind, resources=RESOURCES[res])
    objs = bundle(s, opts)
    for obj in objs:
        assert kubernetes_validate.validate(obj, K8S_VERSION, strict=True) == K8S_VERSION
        assert check_manifest(obj) == [], obj["kind"]
    assert check_bundle(objs) == []
    kinds = [o["kind"] for o in objs]
    expected = ["Namespace", "ConfigMap"] + (
        ["Job"] if kind == "job" else ["Deployment", "Service"]
    )
    if kind == "service" and opts.ingress_enabled:
        expected.append("Ingress")
    assert kinds == expected
    # Labels and ids on every object; one namespace per event.
    ns = namespace_name(opts.namespace_prefix, s.event_id)
    assert ns == "sciorch-evt-a1b2c3d4e5f6"
    for obj in objs:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/managed-by"] == "sciorch"
        assert labels["sciorch.io/event"] == s.event_id
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == ns
            assert labels["sciorch.io/entry"] == s.entry_id
            assert labels["app.kubernetes.io/instance"] == s.entry_id


def test_gpu_job_requests_whole_gpus_on_the_right_nodes() -> None:
    opts = KubernetesOptions.model_validate(OPTIONS["gpus"])
    job = job_manifest(spec(resources=RESOURCES["gpu"]), opts, "spin")
    pod = job["spec"]["template"]["spec"]
    res = pod["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == "2"
    assert res["requests"]["cpu"] == "4" and res["requests"]["memory"] == "16384Mi"
    assert pod["nodeSelector"] == {
        "kubernetes.io/os": "linux",
        "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB",
    }
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    cpu_only = job_manifest(spec(resources=RESOURCES["cpu"]), opts, "spin")["spec"]["template"]
    assert "tolerations" not in cpu_only["spec"]
    assert "nvidia.com/gpu" not in json.dumps(cpu_only)


def test_job_contract_walltime_backoff_and_command() -> None:
    opts = KubernetesOptions.model_validate({"python": "python3.12", "max_walltime_s": 300})
    s = spec(restart_policy="on-failure", max_restarts=2)
    job = job_manifest(s, opts, "spin")
    assert job["spec"]["activeDeadlineSeconds"] == 300  # capped by the site
    assert job["spec"]["backoffLimit"] == 2
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    assert c["command"][:4] == ["/bin/sh", "-c", JOB_WRAPPER, "sciorch-job"]
    # The template's argv: the server's python became the image's, placeholders filled.
    assert c["command"][4:] == [
        "/usr/bin/python3", "-m", "x", "--port", "8080", "--out", "/sciorch/result.json",
    ]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["SCIORCH_PARAMS"] == "/sciorch/params.json"
    assert env["SCIORCH_RESULT"] == "/sciorch/result.json" and env["MODE"] == "fast"
    assert job_manifest(spec(), KubernetesOptions(), "spin")["spec"]["backoffLimit"] == 0


def test_the_servers_python_becomes_the_images() -> None:
    import sys

    s = spec(argv=[sys.executable, "-m", "orchestrator.payloads.sim_instrument"])
    c = job_manifest(s, KubernetesOptions(python="python3.12"), "spin")["spec"]["template"]
    assert c["spec"]["containers"][0]["command"][4:] == [
        "python3.12", "-m", "orchestrator.payloads.sim_instrument"
    ]


def test_service_probe_ingress_and_endpoint() -> None:
    opts = KubernetesOptions.model_validate(OPTIONS["host-ingress"])
    s = spec("service")
    dep = deployment_manifest(s, opts, "spin")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert dep["spec"]["template"]["spec"]["restartPolicy"] == "Always"
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    ing = ingress_manifest(s, opts, "spin")
    assert ing["spec"]["ingressClassName"] == "nginx"
    assert ing["spec"]["tls"] == [
        {"hosts": ["ent-0123456789ab.apps.example.org"], "secretName": "apps-tls"}
    ]
    assert ing["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"] == "64m"
    assert endpoint(s, opts, "spin") == "https://ent-0123456789ab.apps.example.org"
    path_opts = KubernetesOptions.model_validate(OPTIONS["path-ingress"])
    rule = ingress_manifest(s, path_opts, "spin")["spec"]["rules"][0]
    assert rule["host"] == "spin.example.org"
    assert rule["http"]["paths"][0]["path"] == "/sci/ent-0123456789ab"
    assert endpoint(s, path_opts, "spin") == "http://spin.example.org/sci/ent-0123456789ab"
    assert endpoint(s, KubernetesOptions(), "spin") == (
        "http://ent-0123456789ab.sciorch-evt-a1b2c3d4e5f6.svc.cluster.local:8080"
    )


def test_own_checks_catch_what_the_schemas_miss() -> None:
    """Each broken manifest passes kubernetes-validate and fails our checks."""
    opts = KubernetesOptions.model_validate(OPTIONS["gpus"])

    def gpu_job() -> dict[str, Any]:
        return job_manifest(spec(resources=RESOURCES["gpu"]), opts, "spin")

    def res_of(job: dict[str, Any]) -> dict[str, Any]:
        r: dict[str, Any] = job["spec"]["template"]["spec"]["containers"][0]["resources"]
        return r

    broken: dict[str, dict[str, Any]] = {}
    j = gpu_job()
    res_of(j)["limits"]["nvidia.com/gpu"] = res_of(j)["requests"]["nvidia.com/gpu"] = "0.5"
    broken["fractional GPU"] = j
    j = gpu_job()
    res_of(j)["requests"]["nvidia.com/gpu"] = "1"
    broken["request != limit"] = j
    j = gpu_job()
    j["metadata"]["name"] = "Ent_Bad"
    broken["name"] = j
    dep = deployment_manifest(spec("service"), opts, "spin")
    dep["spec"]["selector"]["matchLabels"]["sciorch.io/entry"] = "ent-somebody-else"
    broken["selector"] = dep
    svc = service_manifest(spec("service"), opts, "spin")
    svc["metadata"]["name"] = "1-service"
    broken["RFC 1035 service name"] = svc
    j = gpu_job()
    j["metadata"]["labels"]["sciorch.io/note"] = "not a label value!"
    broken["label value"] = j
    for what, obj in broken.items():
        assert kubernetes_validate.validate(obj, K8S_VERSION, strict=True), what
        assert check_manifest(obj), f"{what} was not caught"
    # Across objects: a Service that selects nothing, an Ingress to a missing Service.
    s = spec("service")
    host = KubernetesOptions.model_validate(OPTIONS["host-ingress"])
    objs = build_manifests(s, host, "spin")
    objs[2]["spec"]["selector"] = {"app.kubernetes.io/instance": "nobody"}
    objs[3]["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"] = "other"
    problems = check_bundle(objs)
    assert any("matches no pod template" in p for p in problems)
    assert any("backend Service 'other' not defined" in p for p in problems)


def test_site_options_are_validated(tmp_path: Path) -> None:
    for bad, field in (
        ({"namespace_prefix": "Sci_"}, "namespace_prefix"),
        ({"ingress_host_template": "{nope}.example.org"}, "ingress_host_template"),
        ({"gpu_node_selectors": {"a100": {"bad key!": "x"}}}, "gpu_node_selectors"),
        ({"endpoint": "ingress"}, ""),
        ({"colour": "red"}, "colour"),
    ):
        with pytest.raises(InvalidInput) as err:
            KubernetesBackend("spin", bad, tmp_path)
        assert (err.value.field or "").startswith("sites.spin"), bad
        assert field in (err.value.field or "") + err.value.message


def test_quantities() -> None:
    assert parse_quantity("15900m") == pytest.approx(15.9)
    assert parse_quantity("64Gi") == 64 * 1024**3
    assert parse_quantity("4") == 4 and parse_quantity(None) == 0


# ============================================================================ the job wrapper


def test_the_wrapper_reports_through_the_log(tmp_path: Path) -> None:
    """The wrapper really runs under /bin/sh; the mirror turns its log back into the contract."""
    work = tmp_path / "pod"
    work.mkdir()
    (work / "params.json").write_text('{"x": 1}')
    script = textwrap.dedent(
        """
        echo "params: $(cat "$SCIORCH_PARAMS")"
        printf 'partial line without newline'
        for i in 0 1 2; do printf '{"i": %d}\\n' "$i" >>"$SCIORCH_STREAM"; sleep 0.05; done
        mkdir -p "$SCIORCH_OUTPUT_DIR/sub"
        echo data >"$SCIORCH_OUTPUT_DIR/sub/plot.png"
        printf '{"value": 42,\\n "ok": true}' >"$SCIORCH_RESULT"
        exit 3
        """
    )
    env = {
        "PATH": os.environ["PATH"],
        "SCIORCH_WORKDIR": str(work),
        "SCIORCH_PARAMS": str(work / "params.json"),
        "SCIORCH_RESULT": str(work / "result.json"),
        "SCIORCH_STREAM": str(work / "stream.jsonl"),
        "SCIORCH_OUTPUT_DIR": str(work / "output"),
    }
    out = subprocess.run(
        ["/bin/sh", "-c", JOB_WRAPPER, "sciorch-job", "sh", "-c", script],
        env=env, capture_output=True, timeout=30, check=False,
    )
    assert out.returncode == 3
    mirror = Mirror(WorkDir(tmp_path / "mirror"), markers=True)
    mirror.switch("pod-1")
    records = []
    raw = out.stdout
    for i in range(0, len(raw), 7):  # arbitrary chunks, as a stream delivers them
        records += mirror.feed(raw[i : i + 7])
    records += mirror.finish()
    assert [r for _, r in records] == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert [i for i, _ in records] == [0, 1, 2]
    wd = mirror.wd
    data = wd.read_results(0)
    assert data.result == {"value": 42, "ok": True}
    assert [r["i"] for r in data.records] == [0, 1, 2]
    assert mirror.artifacts == ["sub/plot.png"]
    assert mirror.exit_code == 3
    text = wd.log.read_text()
    assert 'params: {"x": 1}' in text and "partial line without newline" in text
    assert "@@sciorch" not in text
    # A restarted reader resumes from the byte it reached: nothing twice.
    again = Mirror(wd, markers=True)
    assert again.source == "pod-1" and again.raw_offset == len(raw)
    assert again.stream_count == 3


# ============================================================================ integration

KJOB = "name: kjob" + JOB_BODY

KSVC = r"""
name: ksvc
kind: service
image: python:3.12-slim
command: ["python3", "-m", "http.server", "{port}"]
health: {path: /, timeout_s: 60}
restart: {policy: on-failure, max_restarts: 1}
resources: {cpus: 0.25, memory: 128Mi, walltime: "01:00:00"}
"""

KGPU = r"""
name: kgpu
kind: job
image: busybox:1.36
command: ["sh", "-c", "nvidia-smi || true"]
resources: {cpus: 1, memory: 1Gi, gpus: 1, gpu_type: a100, walltime: "00:10:00"}
"""

GPU_SELECTOR = {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB"}


@pytest.fixture
def catalogue(tmp_path: Path) -> Path:
    d = tmp_path / "kcat"
    d.mkdir()
    (d / "kjob.yaml").write_text(KJOB)
    (d / "ksvc.yaml").write_text(KSVC)
    (d / "kgpu.yaml").write_text(KGPU)
    return d


class Controller(Protocol):
    """What the controllers and kubelets of a cluster do for a scenario: the emulated one acts
    them out, a real cluster does them itself."""

    real: bool

    async def run_job(self, ns: str, job: str) -> None: ...

    async def serve(self, ns: str, deployment: str) -> None: ...

    async def namespace_exists(self, ns: str) -> bool: ...


class Emulated:
    real = False

    def __init__(self, emu: KubeEmulator) -> None:
        self.emu = emu

    async def run_job(self, ns: str, job: str) -> None:
        await self.emu.wait_object("jobs", ns, job)
        pod = self.emu.create_pod(ns, "jobs", job)
        self.emu.start_kubelet(ns, pod)

    async def serve(self, ns: str, deployment: str) -> None:
        await self.emu.wait_object("deployments", ns, deployment)
        pod = self.emu.create_pod(ns, "deployments", deployment)
        self.emu.schedule(ns, pod)
        self.emu.run(ns, pod, ready=False)
        await asyncio.sleep(0.1)
        self.emu.set_ready(ns, pod)

    async def namespace_exists(self, ns: str) -> bool:
        return self.emu.get("namespaces", None, ns) is not None


class Real:
    real = True

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def run_job(self, ns: str, job: str) -> None:
        pass  # the Job controller and a kubelet do it

    async def serve(self, ns: str, deployment: str) -> None:
        pass

    async def namespace_exists(self, ns: str) -> bool:
        backend = self.engine.backends["spin"]
        assert isinstance(backend, KubernetesBackend) and backend.api is not None
        found = await backend.api.get("Namespace", None, ns)
        return found is not None and (found.get("status") or {}).get("phase") != "Terminating"


async def until(
    engine: Engine, entry_id: str, check: Callable[[Entry], bool], within: float = 15.0
) -> Entry:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        entry = await engine.get_entry(ALICE, entry_id)
        if check(entry):
            return entry
        if loop.time() > deadline:
            raise AssertionError(f"entry {entry_id} stuck in {entry.state}: {entry.reason}")
        await asyncio.sleep(0.02)


def site(url: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": "spin",
        "kind": "kubernetes",
        "host": url,
        "gpu_node_selectors": {"a100": GPU_SELECTOR},
        "ingress_host_template": "{entry}.apps.example.org",
        "tls_secret": "apps-tls",
        "image_pull_grace_s": 1,
        **extra,
    }


@pytest.fixture
async def emu() -> AsyncIterator[KubeEmulator]:
    async with KubeEmulator() as e:
        e.add_node("node-1", cpu="16", memory="64Gi")
        e.add_node("node-2", cpu="32", memory="128Gi", gpus=4, labels=GPU_SELECTOR)
        yield e
        assert e.invalid == [], "the backend sent objects the server rejected"


@pytest.fixture
async def open_engine(home: Path, catalogue: Path, emu: KubeEmulator) -> AsyncIterator[Any]:
    engines: list[Engine] = []

    async def make(**extra: Any) -> Engine:
        eng = await Engine.open(
            make_settings(home, sites=[site(emu.url, **extra)], catalogue_dirs=[catalogue])
        )
        engines.append(eng)
        return eng

    yield make
    for eng in engines:
        if eng._lock_fd is not None:  # still open: a test failed half-way
            await shutdown(eng)


@pytest.fixture
async def kengine(open_engine: Any) -> AsyncIterator[Engine]:
    eng = await open_engine()
    try:
        yield eng
    finally:
        await shutdown(eng)


def ns_of(event_id: str) -> str:
    return "sciorch-" + event_id


# ------------------------------------------------------------------ scenarios (both tiers)


async def scenario_job_succeeds(engine: Engine, ctl: Controller) -> Entry:
    ev = await engine.create_event(ALICE, "k8s")
    async with engine.bus.subscribe(lambda m: m.kind == "stream") as sub:
        entry = await engine.launch(ALICE, "kjob", {"records": 3, "value": 7}, event_id=ev.id)
        await ctl.run_job(ns_of(ev.id), entry.id)
        done = await until(engine, entry.id, lambda e: e.state.terminal, 120)
        streamed = []
        while not sub.queue.empty():
            streamed.append(sub.queue.get_nowait())
    assert done.state == EntryState.SUCCEEDED, done.reason
    assert done.exit_code == 0
    assert done.result == {"value": 7}
    assert [m.record for m in streamed] == [{"i": 0}, {"i": 1}, {"i": 2}]
    _, data = await engine.read_results(ALICE, entry.id)
    assert [r["i"] for r in data.records] == [0, 1, 2]
    assert data.artifacts == ["plot.txt"]
    logs = await engine.read_logs(ALICE, entry.id)
    assert "hello world" in logs.data and "@@sciorch" not in logs.data
    assert done.handle["namespace"] == ns_of(ev.id) and done.handle["kind"] == "Job"
    return done


async def scenario_job_fails(engine: Engine, ctl: Controller) -> Entry:
    entry = await engine.launch(ALICE, "kjob", {"code": 3, "who": "failing"})
    ev = await engine.get_event(ALICE, entry.event_id)
    await ctl.run_job(ns_of(ev.id), entry.id)
    done = await until(engine, entry.id, lambda e: e.state.terminal, 120)
    assert done.state == EntryState.FAILED
    assert done.exit_code == 3
    assert "exit code 3" in (done.reason or "")
    assert "hello failing" in (done.reason or "")  # the log tail
    return done


async def scenario_service_ready(engine: Engine, ctl: Controller) -> Entry:
    ev = await engine.create_event(ALICE, "svc")
    entry = await engine.launch(ALICE, "ksvc", event_id=ev.id)
    await ctl.serve(ns_of(ev.id), entry.id)
    ready = await until(engine, entry.id, lambda e: e.state == EntryState.READY, 180)
    assert ready.url == f"{engine.settings.public_url}/entries/{entry.id}/"
    assert [t.state.value for t in ready.transitions][-2:] == ["running", "ready"]
    return ready


async def scenario_stop_event_deletes_the_namespace(engine: Engine, ctl: Controller) -> None:
    ev = await engine.create_event(ALICE, "short-lived")
    job = await engine.launch(ALICE, "kjob", {"sleep": 300}, event_id=ev.id)
    svc = await engine.launch(ALICE, "ksvc", event_id=ev.id)
    await ctl.run_job(ns_of(ev.id), job.id)
    await ctl.serve(ns_of(ev.id), svc.id)
    await until(engine, job.id, lambda e: e.state == EntryState.RUNNING, 120)
    assert await ctl.namespace_exists(ns_of(ev.id))
    stopped = await engine.stop_event(ALICE, ev.id)
    assert stopped.state == EventState.STOPPED
    for eid in (job.id, svc.id):
        done = await engine.get_entry(ALICE, eid)
        assert done.state == EntryState.CANCELLED
        assert done.reason == "event stopped"
    assert not await ctl.namespace_exists(ns_of(ev.id))


# ------------------------------------------------------------------ the emulated tier


async def test_job_pending_running_succeeded_with_results(
    kengine: Engine, emu: KubeEmulator
) -> None:
    ev = await kengine.create_event(ALICE, "k8s")
    entry = await kengine.launch(ALICE, "kjob", {"records": 2}, event_id=ev.id)
    ns = ns_of(ev.id)
    job = await emu.wait_object("jobs", ns, entry.id)
    assert emu.get("namespaces", None, ns) is not None
    params = emu.get("configmaps", ns, entry.id + "-params")
    assert params is not None
    assert params["data"]["params.json"] == json.dumps(entry.parameters, sort_keys=True)
    assert job["spec"]["activeDeadlineSeconds"] == 300
    pod = emu.create_pod(ns, "jobs", entry.id)
    e = await until(kengine, entry.id, lambda e: "scheduler" in (e.reason or ""))
    assert e.state == EntryState.PENDING
    emu.schedule(ns, pod)
    e = await until(kengine, entry.id, lambda e: e.state == EntryState.PROVISIONING)
    assert "node-1" in (e.reason or "")
    await emu.kubelet_run(ns, pod)
    done = await until(kengine, entry.id, lambda e: e.state.terminal)
    assert done.state == EntryState.SUCCEEDED, done.reason
    assert [t.state.value for t in done.transitions] == [
        "pending", "provisioning", "running", "succeeded"
    ]
    assert done.result == {"value": 42}
    assert done.handle["pod"] == pod
    # Status came from watches, not polling: a handful of lists, then watches.
    assert emu.list_count("pods") <= 2
    assert emu.watch_count("pods") >= 1


async def test_job_scenarios_emulated(kengine: Engine, emu: KubeEmulator) -> None:
    # A failing job on the emulator is the contract suite's (tests/test_backend_contract.py).
    await scenario_job_succeeds(kengine, Emulated(emu))


async def test_stream_records_arrive_while_the_job_runs(kengine: Engine, emu: KubeEmulator) -> None:
    entry = await kengine.launch(ALICE, "kjob", {"records": 3, "pause": 0.3, "sleep": 1})
    ns = ns_of(entry.event_id)
    await emu.wait_object("jobs", ns, entry.id)
    pod = emu.create_pod(ns, "jobs", entry.id)
    async with kengine.bus.subscribe(
        lambda m: m.entry_id == entry.id and m.kind in ("stream", "log")
    ) as sub:
        emu.start_kubelet(ns, pod)
        first = await asyncio.wait_for(sub.get(), 10)
        while first.kind != "stream":
            first = await asyncio.wait_for(sub.get(), 10)
        now = await kengine.get_entry(ALICE, entry.id)
        assert now.state == EntryState.RUNNING  # live, not replayed at the end
        assert first.record == {"i": 0}
        chunk = await kengine.read_logs(ALICE, entry.id)
        assert "hello world" in chunk.data
    done = await until(kengine, entry.id, lambda e: e.state.terminal)
    assert done.state == EntryState.SUCCEEDED


async def test_retries_follow_the_backoff_limit(
    home: Path, catalogue: Path, emu: KubeEmulator
) -> None:
    (catalogue / "kjob.yaml").write_text(
        KJOB + "restart: {policy: on-failure, max_restarts: 1}\n"
    )
    eng = await Engine.open(
        make_settings(home, sites=[site(emu.url)], catalogue_dirs=[catalogue])
    )
    try:
        entry = await eng.launch(ALICE, "kjob", {"code": 4})
        ns = ns_of(entry.event_id)
        job = await emu.wait_object("jobs", ns, entry.id)
        assert job["spec"]["backoffLimit"] == 1
        first = emu.create_pod(ns, "jobs", entry.id, suffix="one")
        await emu.kubelet_run(ns, first, finish_job=False)
        retrying = await until(eng, entry.id, lambda e: e.restarts == 1)
        assert "retrying after exit code 4" in (retrying.reason or "")
        second = emu.create_pod(ns, "jobs", entry.id, suffix="two")
        await emu.kubelet_run(ns, second)
        done = await until(eng, entry.id, lambda e: e.state.terminal)
        assert done.state == EntryState.FAILED and done.exit_code == 4
        assert "after 2 attempts" in (done.reason or "")
        logs = await eng.read_logs(ALICE, entry.id)
        assert logs.data.count("hello world") == 2  # both attempts' logs are kept
    finally:
        await shutdown(eng)


async def test_service_ready_restarts_and_url(kengine: Engine, emu: KubeEmulator) -> None:
    ready = await scenario_service_ready(kengine, Emulated(emu))
    ns = ns_of(ready.event_id)
    assert emu.get("services", ns, ready.id) is not None
    ing = emu.get("ingresses", ns, ready.id)
    assert ing is not None and ing["spec"]["tls"][0]["secretName"] == "apps-tls"
    stored = await kengine.store.get_entry(ready.id)
    assert stored is not None and stored.endpoint == f"https://{ready.id}.apps.example.org"
    (pod,) = [p["metadata"]["name"] for p in emu.items("pods", ns)]
    # Readiness lost and regained.
    emu.set_ready(ns, pod, False)
    await until(kengine, ready.id, lambda e: e.state == EntryState.RUNNING)
    emu.set_ready(ns, pod, True)
    await until(kengine, ready.id, lambda e: e.state == EntryState.READY)
    # One restart is allowed (on-failure, max 1); the second ends it.
    emu.restart_container(ns, pod, 1)
    again = await until(kengine, ready.id, lambda e: e.restarts == 1)
    assert any(
        t.state == EntryState.PROVISIONING and "restarting after exit code 1" in (t.reason or "")
        for t in again.transitions
    )
    emu.set_ready(ns, pod, True)
    await until(kengine, ready.id, lambda e: e.state == EntryState.READY)
    emu.restart_container(ns, pod, 2)
    done = await until(kengine, ready.id, lambda e: e.state.terminal)
    assert done.state == EntryState.FAILED
    assert "restart policy 'on-failure' allows 1 restarts" in (done.reason or "")
    assert emu.get("deployments", ns, ready.id) is None  # cleaned up


async def test_service_whose_readiness_never_passes(
    kengine: Engine, emu: KubeEmulator, catalogue: Path
) -> None:
    (catalogue / "ksvc.yaml").write_text(KSVC.replace("timeout_s: 60", "timeout_s: 0.5"))
    await shutdown(kengine)
    eng = await Engine.open(
        make_settings(kengine.settings.home, sites=[site(emu.url)], catalogue_dirs=[catalogue])
    )
    try:
        svc = await eng.launch(ALICE, "ksvc")
        ns = ns_of(svc.event_id)
        await emu.wait_object("deployments", ns, svc.id)
        pod = emu.create_pod(ns, "deployments", svc.id)
        emu.schedule(ns, pod)
        emu.run(ns, pod, ready=False)
        emu.write_log(ns, pod, "Serving HTTP on 0.0.0.0 port 8080\n")
        done = await until(eng, svc.id, lambda e: e.state.terminal)
        assert done.state == EntryState.FAILED
        assert "readiness probe GET / did not pass" in (done.reason or "")
        assert "Serving HTTP" in (done.reason or "")
    finally:
        await shutdown(eng)


async def test_stuck_image_pull_is_visible_then_fails(kengine: Engine, emu: KubeEmulator) -> None:
    entry = await kengine.launch(ALICE, "kjob")
    ns = ns_of(entry.event_id)
    await emu.wait_object("jobs", ns, entry.id)
    pod = emu.create_pod(ns, "jobs", entry.id)
    emu.schedule(ns, pod)
    await until(kengine, entry.id, lambda e: e.state == EntryState.PROVISIONING)
    emu.waiting(ns, pod, "ImagePullBackOff", 'Back-off pulling image "busybox:1.36"')
    emu.event(ns, "Pod", pod, "Failed", 'Failed to pull image "busybox:1.36": not found')
    stuck = await until(kengine, entry.id, lambda e: "ImagePullBackOff" in (e.reason or ""))
    assert stuck.state == EntryState.PENDING
    assert 'Back-off pulling image "busybox:1.36"' in (stuck.reason or "")
    done = await until(kengine, entry.id, lambda e: e.state.terminal)  # grace: 1 s
    assert done.state == EntryState.FAILED
    assert "ImagePullBackOff" in (done.reason or "") and "gave up" in (done.reason or "")
    assert emu.get("jobs", ns, entry.id) is None


async def test_unschedulable_reason_from_events(kengine: Engine, emu: KubeEmulator) -> None:
    entry = await kengine.launch(ALICE, "kgpu")
    ns = ns_of(entry.event_id)
    job = await emu.wait_object("jobs", ns, entry.id)
    pod_spec = job["spec"]["template"]["spec"]
    assert pod_spec["nodeSelector"] == GPU_SELECTOR
    assert pod_spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    pod = emu.create_pod(ns, "jobs", entry.id)
    msg = "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."
    emu.event(ns, "Pod", pod, "FailedScheduling", msg)
    stuck = await until(kengine, entry.id, lambda e: "Insufficient" in (e.reason or ""))
    assert stuck.state == EntryState.PENDING
    assert stuck.reason == f"FailedScheduling: {msg}"
    await asyncio.sleep(0.3)
    assert (await kengine.get_entry(ALICE, entry.id)).state == EntryState.PENDING  # a queue
    emu.schedule(ns, pod, "node-2")
    emu.run(ns, pod)
    await until(kengine, entry.id, lambda e: e.state == EntryState.RUNNING)
    cancelled = await kengine.cancel(ALICE, entry.id)
    assert cancelled.state == EntryState.CANCELLED
    assert emu.get("jobs", ns, entry.id) is None
    assert emu.get("configmaps", ns, entry.id + "-params") is None


async def test_stop_event_deletes_the_namespace(kengine: Engine, emu: KubeEmulator) -> None:
    await scenario_stop_event_deletes_the_namespace(kengine, Emulated(emu))
    assert any(m == "DELETE" and p.endswith("/namespaces/" + ns) for m, p, _ in emu.requests
               for ns in [p.rsplit("/", 1)[-1]])


async def test_forbidden_create_fails_clearly(kengine: Engine, emu: KubeEmulator) -> None:
    emu.inject(403, method="POST", path="/jobs$", message='jobs.batch is forbidden: User '
               '"system:serviceaccount:sci:sciorch" cannot create resource "jobs"')
    with pytest.raises(BackendError) as err:
        await kengine.launch(ALICE, "kjob")
    assert "403 Forbidden" in err.value.message and "cannot create resource" in err.value.message
    (entry,), _ = await kengine.list_entries(ALICE)
    assert entry.state == EntryState.FAILED and "403" in (entry.reason or "")
    ns = ns_of(entry.event_id)
    assert emu.get("configmaps", ns, entry.id + "-params") is None  # rolled back


async def test_server_errors_are_retried(kengine: Engine, emu: KubeEmulator) -> None:
    emu.inject(500, method="POST", path="/configmaps$", times=2)
    emu.inject(503, method="POST", path="/jobs$")
    entry = await kengine.launch(ALICE, "kjob")
    ns = ns_of(entry.event_id)
    # And the watch of pods fails twice before it works: backoff, then a fresh list.
    emu.inject(500, path="/pods$", watch=True, times=2)
    emu.drop_watches()
    await emu.wait_object("jobs", ns, entry.id)
    pod = emu.create_pod(ns, "jobs", entry.id)
    await emu.kubelet_run(ns, pod)
    done = await until(kengine, entry.id, lambda e: e.state.terminal)
    assert done.state == EntryState.SUCCEEDED and done.result == {"value": 42}


async def test_dropped_watches_and_410_gone(kengine: Engine, emu: KubeEmulator) -> None:
    entry = await kengine.launch(ALICE, "kjob", {"sleep": 30})
    ns = ns_of(entry.event_id)
    await emu.wait_object("jobs", ns, entry.id)
    pod = emu.create_pod(ns, "jobs", entry.id)
    await until(kengine, entry.id, lambda e: "scheduler" in (e.reason or ""))
    watches, lists = emu.watch_count("pods"), emu.list_count("pods")
    # A dropped watch resumes from its resourceVersion: no relist, nothing missed.
    emu.drop_watches()
    emu.schedule(ns, pod)
    await until(kengine, entry.id, lambda e: e.state == EntryState.PROVISIONING)
    assert emu.watch_count("pods") > watches and emu.list_count("pods") == lists
    # History compacted past the pod watch's resourceVersion: the resumed watch gets 410
    # Gone, and the backend lists again.
    emu.event(ns, "Pod", pod, "Pulled", "Successfully pulled image", type_="Normal")
    emu.expire_history()
    emu.drop_watches()
    await emu.wait_for(lambda: emu.list_count("pods") > lists)
    emu.run(ns, pod)
    await until(kengine, entry.id, lambda e: e.state == EntryState.RUNNING)
    assert emu.list_count("pods") > lists
    # A 410 sent as a watch ERROR event: the same.
    lists = emu.list_count("pods")
    emu.inject(410, path="/pods$", watch=True)
    emu.drop_watches()
    await emu.wait_for(lambda: emu.list_count("pods") > lists)
    emu.write_log(ns, pod, "still going\n")
    emu.terminate(ns, pod, 0)
    emu.complete_job(ns, entry.id)
    done = await until(kengine, entry.id, lambda e: e.state.terminal)
    assert done.state == EntryState.SUCCEEDED
    assert emu.list_count("pods") > lists
    assert "still going" in (await kengine.read_logs(ALICE, entry.id)).data


async def test_create_conflicts_adopt_ours_and_refuse_others(
    emu: KubeEmulator, tmp_path: Path
) -> None:
    calls: list[tuple[str, EntryState, dict[str, Any]]] = []

    class Recorder:
        async def transition(self, entry_id: str, state: EntryState, **kw: Any) -> None:
            calls.append((entry_id, state, kw))

        async def log_grew(self, entry_id: str, size: int) -> None:
            pass

        async def stream_record(self, entry_id: str, index: int, record: dict[str, Any]) -> None:
            pass

    backend = KubernetesBackend("spin", {"host": emu.url}, tmp_path)
    await backend.start(Recorder())
    try:
        s = spec(argv=["sh", "-c", "true"])
        opts = backend.options
        # Ours already (a retried submit): 409 on each create, adopted.
        emu.put("namespaces", namespace_manifest(s.event_id, "spin", opts))
        for obj in build_manifests(s, opts, "spin"):
            emu.put(obj["kind"].lower() + "s", obj)
        await backend.submit(s)
        assert calls[-1][1] == EntryState.PENDING and calls[-1][2]["handle"]["name"] == s.entry_id
        # Somebody else's Job with the same name: refused.
        other = spec(entry_id="ent-ffffffffffff", argv=["sh", "-c", "true"])
        job = build_manifests(other, opts, "spin")[1]
        job["metadata"]["labels"]["sciorch.io/entry"] = "ent-000000000000"
        emu.put("jobs", job)
        with pytest.raises(BackendError, match="already exists and is not entry"):
            await backend.submit(other)
        # A namespace of the same name that is not ours: refused.
        emu.put("namespaces", {"metadata": {"name": "sciorch-evt-000000000001"}})
        with pytest.raises(BackendError, match="does not belong to event"):
            await backend.submit(spec(event_id="evt-000000000001", entry_id="ent-eeeeeeeeeeee"))
    finally:
        await backend.close()


async def test_server_restart_re_adopts(open_engine: Any, emu: KubeEmulator) -> None:
    eng = await open_engine()
    running = await eng.launch(ALICE, "kjob", {"sleep": 30})
    finishes = await eng.launch(ALICE, "kjob", {"value": 9})
    ns = ns_of(running.event_id)
    pods = {}
    for entry in (running, finishes):
        await emu.wait_object("jobs", ns, entry.id)
        pods[entry.id] = emu.create_pod(ns, "jobs", entry.id)
        emu.schedule(ns, pods[entry.id])
        emu.run(ns, pods[entry.id])
        emu.write_log(ns, pods[entry.id], "before the restart\n")
        await until(eng, entry.id, lambda e: e.state == EntryState.RUNNING)
    await until(eng, running.id, lambda e: e.handle.get("pod") is not None)
    await eng.close()  # the server goes away; the cluster goes on
    emu.write_log(ns, pods[finishes.id], "while nobody watched\n")
    emu.write_log(ns, pods[finishes.id], '@@sciorch:result-begin\n{"value": 9}\n'
                  "@@sciorch:result-end\n@@sciorch:exit 0\n")
    emu.terminate(ns, pods[finishes.id], 0)
    emu.complete_job(ns, finishes.id)
    eng = await open_engine()
    try:
        done = await until(eng, finishes.id, lambda e: e.state.terminal)
        assert done.state == EntryState.SUCCEEDED and done.result == {"value": 9}
        logs = (await eng.read_logs(ALICE, finishes.id)).data
        assert logs.count("before the restart") == 1 and "while nobody watched" in logs
        still = await eng.get_entry(ALICE, running.id)
        assert still.state == EntryState.RUNNING  # re-adopted, not failed
        emu.write_log(ns, pods[running.id], "after the restart\n")
        emu.terminate(ns, pods[running.id], 0)
        emu.complete_job(ns, running.id)
        done = await until(eng, running.id, lambda e: e.state.terminal)
        assert done.state == EntryState.SUCCEEDED
        logs = (await eng.read_logs(ALICE, running.id)).data
        assert logs == "before the restart\nafter the restart\n"
    finally:
        await shutdown(eng)


async def test_a_job_deleted_while_the_server_was_down(open_engine: Any, emu: KubeEmulator) -> None:
    eng = await open_engine()
    entry = await eng.launch(ALICE, "kjob")
    ns = ns_of(entry.event_id)
    await emu.wait_object("jobs", ns, entry.id)
    await eng.close()
    emu.remove("jobs", ns, entry.id)
    eng = await open_engine()
    try:
        done = await until(eng, entry.id, lambda e: e.state.terminal)
        assert done.state == EntryState.FAILED and "is gone" in (done.reason or "")
    finally:
        await shutdown(eng)


async def test_site_facts_for_the_router(kengine: Engine, emu: KubeEmulator) -> None:
    (spin,) = await kengine.list_sites()
    assert spin.kind == "kubernetes" and spin.status.value == "up"
    assert spin.capabilities.cpus == 32 and spin.capabilities.gpus == 4
    assert spin.capabilities.gpu_types == ["a100"]
    assert spin.estimated_wait_s == 0
    backend = kengine.backends["spin"]
    assert isinstance(backend, KubernetesBackend)
    # Pending pods lengthen the estimate.
    entry = await kengine.launch(ALICE, "kjob")
    ns = ns_of(entry.event_id)
    await emu.wait_object("jobs", ns, entry.id)
    emu.create_pod(ns, "jobs", entry.id)
    await until(kengine, entry.id, lambda e: "scheduler" in (e.reason or ""))
    assert await backend.estimate_wait(Resources()) >= 60
    # Requests no node can hold are refused by the router.
    with pytest.raises(NoSiteAvailable, match="GPU"):
        await kengine.launch(ALICE, "kjob", resources=ResourceRequest(gpus=8))
    with pytest.raises(NoSiteAvailable, match="v100"):
        await kengine.launch(ALICE, "kgpu", resources=ResourceRequest(gpu_type="v100"))
    # A watch the cluster forbids degrades the site, with the reason.
    emu.inject(403, path="/pods$", watch=True, times=4, message="pods is forbidden")
    emu.drop_watches()
    await emu.wait_for(lambda: any("forbidden" in p for p in backend.watches.problems()))
    status, why = await backend.status()
    assert status.value == "degraded" and "forbidden" in (why or "")
    await emu.wait_for(lambda: not backend.watches.problems(), 15)
    assert (await backend.status())[0].value == "up"


# ------------------------------------------------------------------ the real-cluster tier

real_only = pytest.mark.skipif(
    not REAL, reason="set KUBECONFIG to run the integration scenarios against a real cluster"
)


@pytest.fixture
async def real_engine(home: Path, catalogue: Path) -> AsyncIterator[Engine]:
    sites = [
        {
            "name": "spin",
            "kind": "kubernetes",
            "kubeconfig": REAL,
            "context": os.environ.get("SCIORCH_KUBE_CONTEXT"),
            "namespace_prefix": "sciorch-test-",
            "image_pull_grace_s": 120,
        }
    ]
    eng = await Engine.open(make_settings(home, sites=sites, catalogue_dirs=[catalogue]))
    try:
        yield eng
    finally:
        for ev in await eng.list_events(ALICE):
            await eng.stop_event(ALICE, ev.id)
        await shutdown(eng)


def real_ns(event_id: str) -> str:
    return "sciorch-test-" + event_id


@real_only
@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "scenario",
    [scenario_job_succeeds, scenario_job_fails, scenario_service_ready,
     scenario_stop_event_deletes_the_namespace],
)
async def test_real_cluster(
    real_engine: Engine,
    scenario: Callable[[Engine, Controller], Awaitable[Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(f"{__name__}.ns_of", real_ns)
    await scenario(real_engine, Real(real_engine))


async def test_free_gpus_are_allocatable_minus_the_requests_of_bound_pods(
    open_engine: Any, emu: KubeEmulator
) -> None:
    eng = await open_engine(refresh_s=0.05)
    try:
        backend = eng.backends["spin"]
        assert isinstance(backend, KubernetesBackend)

        async def free() -> tuple[int | None, int | None]:
            await backend.cluster.refresh(backend.api)  # type: ignore[arg-type]
            caps = await backend.capabilities()
            return caps.gpus_free, caps.gpus_total

        assert await free() == (4, 4)
        entry = await eng.launch(ALICE, "kgpu")
        ns = ns_of(entry.event_id)
        await emu.wait_object("jobs", ns, entry.id)
        pod = emu.create_pod(ns, "jobs", entry.id)
        assert await free() == (4, 4)  # pending, bound to no node: holds nothing yet
        emu.schedule(ns, pod, "node-2")
        emu.run(ns, pod)
        assert await free() == (3, 4)
        (spin,) = await eng.list_sites()  # what list_sites and the Sites page report
        assert (spin.capabilities.gpus_free, spin.capabilities.gpus_total) == (3, 4)
        emu.terminate(ns, pod, 0)
        assert await free() == (4, 4)  # a finished pod holds nothing
    finally:
        await shutdown(eng)
