"""The facility deployment in deploy/: the container image definition and the Kubernetes
manifests.

* Every manifest (and the kustomize rendering, with the real kubectl) validates with
  kubernetes-validate, strict, for the versions the backend's manifests are checked against.
* What kubernetes-validate cannot see is checked here: selectors match the pod template's
  labels; probe ports, the container port, the Service's targetPort, the Ingress backend and the
  image's EXPOSE and HEALTHCHECK agree; the probe paths are routes the HTTP app serves; the
  ConfigMap's config.toml loads with sciorch's own settings loader and, with the example Secret's
  URL in $SCIORCH_STORE, gives a PostgreSQL store; every Secret key referenced exists; the image's
  numeric non-root user is the pod's; every path the server writes is a writable volume.
* /readyz, the readiness probe, follows the store (real SQLite and real PostgreSQL behind a real
  uvicorn server): 503 once the store is gone, while /healthz (liveness) still answers 200.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml

from ground.config import load_settings
from orchestrator.engine import Engine
from sciorch.web.app import create_http_app
from tests.conftest import BOTH_STORES
from tests.mcp_helpers import free_socket, serve_asgi

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
KUBE = DEPLOY / "kubernetes"
CONTAINERFILE = DEPLOY / "Containerfile"
# The oldest and newest Kubernetes the manifests are meant for (kubernetes-validate bundles
# schemas up to 1.37).
K8S_VERSIONS = ("1.30", "1.33", "1.37")


# ------------------------------------------------------------------ loading


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def manifests() -> list[dict[str, Any]]:
    """The objects `kubectl apply -k deploy/kubernetes` applies (kustomization's resources)."""
    kustomization = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    return [doc for name in kustomization["resources"] for doc in load_docs(KUBE / name)]


def one(kind: str, docs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    found = [d for d in (docs if docs is not None else manifests()) if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def example_secrets() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in load_docs(KUBE / "secret.example.yaml")}


def container() -> dict[str, Any]:
    containers = one("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    c: dict[str, Any] = containers[0]
    return c


def containerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of the final stage, continuation lines joined."""
    text = re.sub(r"\\\n", " ", CONTAINERFILE.read_text())
    out: list[tuple[str, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        if op.upper() == "FROM":
            out = []  # a new stage: only the last one is the image
        out.append((op.upper(), rest.strip()))
    return out


def instruction(op: str) -> str:
    found = [rest for o, rest in containerfile() if o == op]
    assert found, f"the Containerfile's final stage has no {op}"
    return found[-1]  # the last one wins, as in docker


def container_port(ref: int | str) -> int:
    """A port reference (number or name) resolved against the container's ports."""
    ports = container()["ports"]
    for p in ports:
        if ref in (p["containerPort"], p.get("name")):
            return int(p["containerPort"])
    raise AssertionError(f"port {ref!r} is none of the container's {ports}")


# ------------------------------------------------------------------ schema validation


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_validates_strict(version: str) -> None:
    files = sorted(p for p in KUBE.glob("*.yaml") if p.name != "kustomization.yaml")
    assert {p.name for p in files} >= {"deployment.yaml", "secret.example.yaml"}
    for path in files:
        for doc in load_docs(path):
            assert kubernetes_validate.validate(doc, version, strict=True) == version, path.name


def test_kustomization_applies_every_manifest_but_the_example_secret() -> None:
    kustomization = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    on_disk = {p.name for p in KUBE.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == on_disk - {"secret.example.yaml"}
    # Its image override must name the Deployment's image, or it silently does nothing.
    image = container()["image"].rsplit(":", 1)[0]
    assert [i["name"] for i in kustomization.get("images", [])] == [image]
    kinds = {d["kind"] for d in manifests()}
    assert kinds == {"ConfigMap", "Deployment", "Service", "Ingress", "PodDisruptionBudget"}
    assert "Secret" not in kinds  # real credentials are created apart, never from git


def test_kustomize_build_renders_valid_objects() -> None:
    """The real `kubectl kustomize`: what `kubectl apply -k` would send, validated strict."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail("CI=true and no kubectl (apt-get install kubectl)")
        pytest.skip("no kubectl")
    out = subprocess.run(
        [kubectl, "kustomize", str(KUBE)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    rendered = [d for d in yaml.safe_load_all(out) if d]
    assert len(rendered) == len(manifests())
    for doc in rendered:
        assert kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)
    tag = yaml.safe_load((KUBE / "kustomization.yaml").read_text())["images"][0]["newTag"]
    image = one("Deployment", rendered)["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image.endswith(f":{tag}")


# ------------------------------------------------------------------ what validation misses


def test_selectors_match_the_pod_template() -> None:
    deployment = one("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]

    def selects(selector: dict[str, str], what: str) -> None:
        assert selector, f"{what}: an empty selector selects everything"
        assert selector.items() <= labels.items(), f"{what}: {selector} vs template {labels}"

    selects(deployment["spec"]["selector"]["matchLabels"], "Deployment")
    selects(one("Service")["spec"]["selector"], "Service")
    selects(one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"], "PodDisruptionBudget")
    spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    for c in spread:
        selects(c["labelSelector"]["matchLabels"], "topologySpreadConstraints")


def test_replicas_survive_a_disruption() -> None:
    deployment = one("Deployment")
    replicas = deployment["spec"]["replicas"]
    pdb = one("PodDisruptionBudget")["spec"]
    assert replicas >= 2
    assert 1 <= pdb["minAvailable"] < replicas  # else a node drain can never proceed
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_ports_agree_from_image_to_ingress() -> None:
    c = container()
    port = container_port(c["ports"][0]["containerPort"])
    # The server listens where the container port says.
    args = c["args"]
    assert args[args.index("--port") + 1] == str(port)
    assert args[args.index("--host") + 1] == "0.0.0.0"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container_port(c[probe]["httpGet"]["port"]) == port, probe
    service = one("Service")
    (sport,) = service["spec"]["ports"]
    assert container_port(sport["targetPort"]) == port
    # The Ingress sends every host's traffic to that Service port.
    ingress = one("Ingress")
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            assert backend["name"] == service["metadata"]["name"]
            assert backend["port"].get("name", sport["port"]) in (sport["name"], sport["port"])
            assert backend["port"].get("number", sport["port"]) == sport["port"]
    # The image: EXPOSE, the default CMD and the HEALTHCHECK use the same port.
    assert instruction("EXPOSE").split() == [str(port)]
    cmd = json.loads(instruction("CMD"))
    assert cmd[cmd.index("--port") + 1] == str(port)
    health = instruction("HEALTHCHECK")
    assert f"127.0.0.1:{port}/healthz" in health


def test_probe_paths_are_served_by_the_http_app(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from ground.config import load_settings

    c = container()
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # Routes are built without a running engine (the web hub reads only its settings).
    engine: Any = SimpleNamespace(settings=load_settings(tmp_path / "home"))
    paths = {getattr(r, "path", None) for r in create_http_app(engine).routes}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["path"] in paths, probe


def test_ingress_serves_tls_for_the_public_url() -> None:
    ingress = one("Ingress")["spec"]
    tls_hosts = {h for t in ingress["tls"] for h in t["hosts"]}
    assert all(t.get("secretName") for t in ingress["tls"])
    rule_hosts = {r["host"] for r in ingress["rules"]}
    assert rule_hosts and rule_hosts <= tls_hosts  # no host answered in plain HTTP only
    config = tomllib.loads(one("ConfigMap")["data"]["config.toml"])
    assert config["public_url"] in {f"https://{h}" for h in rule_hosts}


@pytest.fixture
def pod_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """This process's environment as the pod's: the ConfigMap's file at $SCIORCH_CONFIG and
    the example Secret's values for the secretKeyRefs. Yields the pod's home (in tmp_path)."""
    c = container()
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in one("Deployment")["spec"]["template"]["spec"]["volumes"]}
    configmap = one("ConfigMap")
    secrets = example_secrets()
    home = tmp_path / "home"
    for name in ("SCIORCH_CONFIG", "SCIORCH_STORE", "SCIORCH_PUBLIC_URL", "SCIORCH_HOME"):
        monkeypatch.delenv(name, raising=False)
    for var in c["env"]:
        if "value" in var:
            value = var["value"]
            if var["name"] == "SCIORCH_CONFIG":
                # The file the ConfigMap volume puts at that path, copied under tmp_path.
                (mount,) = (m for m in mounts.values() if value.startswith(m["mountPath"] + "/"))
                volume = volumes[mount["name"]]["configMap"]
                assert volume["name"] == configmap["metadata"]["name"]
                rel = value.removeprefix(mount["mountPath"] + "/")
                (item,) = (i for i in volume["items"] if i["path"] == rel)
                local = tmp_path / rel
                local.write_text(configmap["data"][item["key"]])
                value = str(local)
            elif var["name"] == "SCIORCH_HOME":
                value = str(home)
            monkeypatch.setenv(var["name"], value)
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            assert ref["name"] in secrets, f"{var['name']}: no example Secret {ref['name']}"
            data = secrets[ref["name"]]["stringData"]
            assert ref["key"] in data, f"{var['name']}: Secret {ref['name']} has no {ref['key']}"
            monkeypatch.setenv(var["name"], data[ref["key"]])
    yield home


def test_configmap_config_loads_with_a_postgresql_store(pod_env: Path) -> None:
    settings = load_settings(pod_env)
    secret_url = example_secrets()["sciorch-store"]["stringData"]["url"]
    assert settings.store_url == secret_url
    # The password is never in the ConfigMap: the store comes from the Secret alone.
    assert "store" not in tomllib.loads(one("ConfigMap")["data"]["config.toml"])
    assert settings.port == container_port("http")
    assert settings.host == "0.0.0.0"
    assert settings.public_url.startswith("https://")


def test_every_secret_reference_names_an_example_key() -> None:
    secrets = example_secrets()
    spec = one("Deployment")["spec"]["template"]["spec"]
    refs = [
        (v["valueFrom"]["secretKeyRef"]["name"], v["valueFrom"]["secretKeyRef"]["key"])
        for v in container()["env"]
        if "valueFrom" in v
    ]
    for vol in spec["volumes"]:
        if "secret" in vol:
            items = vol["secret"].get("items") or []
            assert items, f"volume {vol['name']}: list the keys, so a missing one fails the pod"
            refs += [(vol["secret"]["secretName"], i["key"]) for i in items]
    assert ("sciorch-store", "url") in refs
    for name, key in refs:
        assert name in secrets and key in secrets[name]["stringData"], (name, key)
    # The keys land where the server reads them: <home>/keys/<the files auth.py and the engine
    # name>; the mount is read-only, so a key the server would otherwise make must be there.
    from mcp_server.auth import PRIVATE, PUBLIC
    from orchestrator.engine import ENTRY_TOKEN_KEY

    home = next(v["value"] for v in container()["env"] if v["name"] == "SCIORCH_HOME")
    (keys,) = (m for m in container()["volumeMounts"] if m["name"] == "signing-key")
    assert keys["mountPath"] == f"{home}/keys"
    (vol,) = (v for v in spec["volumes"] if v["name"] == "signing-key")
    assert {i["path"] for i in vol["secret"]["items"]} == {PRIVATE, PUBLIC, ENTRY_TOKEN_KEY}


def test_runs_as_the_images_non_root_user_on_a_read_only_root() -> None:
    user, _, group = instruction("USER").partition(":")
    assert user.isdigit() and int(user) != 0, "runAsNonRoot needs a numeric non-root USER"
    pod = one("Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] == int(user)
    assert pod["runAsGroup"] == int(group or user)
    c = container()
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    # Everything the server writes must be a writable volume on that read-only root.
    env = {v["name"]: v.get("value") for v in c["env"]}
    image_env = dict(re.findall(r"(\w+)=(\S+)", instruction("ENV")))
    assert env["SCIORCH_HOME"] == image_env["SCIORCH_HOME"]
    writable = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
    for path in (env["SCIORCH_HOME"], "/tmp", image_env["MPLCONFIGDIR"], image_env["HOME"]):
        assert any(path == w or path.startswith(w + "/") for w in writable), path
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= c["resources"][kind].keys(), kind


def test_image_entrypoint_is_the_installed_server() -> None:
    assert json.loads(instruction("ENTRYPOINT")) == ["sciorch", "serve"]
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "sciorch" in pyproject["project"]["scripts"]
    build = CONTAINERFILE.read_text()
    assert re.search(r'pip install "/src\[postgresql\]"', build)
    assert "postgresql" in pyproject["project"]["optional-dependencies"]
    assert re.match(r"python:3\.11-slim\b", instruction("FROM"))


def test_build_context_keeps_every_package() -> None:
    """.dockerignore must not drop a package pyproject installs (a new one, say), nor ship
    the virtual environment."""
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(rel: str) -> bool:
        return any(
            fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(rel, p.removeprefix("**/")) for p in patterns
        )

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    needed = [p.replace(".", "/") for p in pyproject["tool"]["setuptools"]["packages"]]
    needed += ["pyproject.toml", pyproject["project"]["readme"]]
    for rel in needed:
        parts = Path(rel).parts
        for i in range(1, len(parts) + 1):
            assert not ignored("/".join(parts[:i])), rel
    assert ignored(".venv") and ignored(".git")
    for pkg in pyproject["tool"]["setuptools"]["package-data"]:
        assert not ignored(pkg)


# ------------------------------------------------------------------ /readyz




@BOTH_STORES
async def test_readyz_follows_the_store_and_healthz_does_not(engine: Engine) -> None:
    async with (
        serve_asgi(create_http_app(engine), free_socket()) as base,
        httpx.AsyncClient(base_url=base, timeout=10, trust_env=False) as http,
    ):
        ready = await http.get("/readyz")
        assert (ready.status_code, ready.json()) == (200, {"ok": True})
        await engine.store.close()  # the store goes away (PostgreSQL: the pool is closed)
        ready = await http.get("/readyz")
        assert ready.status_code == 503
        assert ready.json() == {"ok": False, "error": "store_unavailable"}
        alive = await http.get("/healthz")
        assert alive.status_code == 200 and alive.json()["ok"] is True
