"""Kubernetes manifests for the kubernetes backend: pure functions from a `LaunchSpec` and the
site's options to plain dicts, plus the checks that schemas miss.

Nothing here talks to a cluster. `build_manifests` returns every object one entry needs, in the
order they must be created; `check_bundle` is the project's own validation of such a bundle
(RFC 1123 / 1035 names, label syntax, whole-number GPU quantities with request == limit,
selectors that match the pod template's labels, references between the objects), run by the
backend before anything is sent and by the tests on every builder's output.

The job contract inside a pod (see `backends.kubernetes` for the whole story): the entry's work
dir is an emptyDir (or a sub-path of a shared PVC) mounted at /sciorch, the parameters come from a
ConfigMap mounted as /sciorch/params.json, and a POSIX-sh wrapper echoes stream records, the
result and the exit status to the pod log between `@@sciorch:` marker lines.
"""

from __future__ import annotations

import base64
import json
import math
import re
import sys
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from backends.base import LaunchSpec
from backends.supervisor import script_text
from ground.contract import INPUTS_DIR

# ----------------------------------------------------------------------------- constants

CONTAINER = "main"
WORK_ROOT = "/sciorch"
PARAMS_KEY = "params.json"
UPLOAD_KEY = "form"
PORT_NAME = "http"
MARK = "@@sciorch:"
LABEL_PREFIX = "sciorch.io/"
ENTRY_LABEL = "sciorch.io/entry"
EVENT_LABEL = "sciorch.io/event"
SITE_LABEL = "sciorch.io/site"
MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "sciorch"

# The job wrapper inside the pod: backends/scripts/kube-job-wrapper.sh (its header says how it
# works), run as /bin/sh -c JOB_WRAPPER sciorch-job COMMAND [ARG...].
JOB_WRAPPER = script_text("kube-job-wrapper.sh")

# ----------------------------------------------------------------------------- names

_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL1035_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_QUALIFIED_NAME_RE = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE_RE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_PORT_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
_ENV_NAME_RE = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_QUANTITY_RE = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$")


def is_dns1123_label(s: str) -> bool:
    return len(s) <= 63 and bool(_LABEL_RE.match(s))


def is_dns1035_label(s: str) -> bool:
    return len(s) <= 63 and bool(_LABEL1035_RE.match(s))


def is_dns1123_subdomain(s: str) -> bool:
    return len(s) <= 253 and bool(_SUBDOMAIN_RE.match(s))


def is_label_key(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    if prefix and not is_dns1123_subdomain(prefix):
        return False
    return len(name) <= 63 and bool(_QUALIFIED_NAME_RE.match(name))


def is_label_value(value: str) -> bool:
    return len(value) <= 63 and bool(_LABEL_VALUE_RE.match(value))


def is_port_name(name: str) -> bool:
    return (
        len(name) <= 15
        and bool(_PORT_NAME_RE.match(name))
        and "--" not in name
        and any(c.isalpha() for c in name)
    )


def dns1123_label(text: str, max_len: int = 63) -> str:
    """`text` made into an RFC 1123 label: lower case, other characters as '-', trimmed."""
    s = re.sub(r"[^a-z0-9-]+", "-", text.lower())
    s = re.sub(r"-{2,}", "-", s)[:max_len].strip("-")
    return s or "x"


def label_value(text: str) -> str:
    """`text` made into a label value (<= 63 characters, alphanumeric at both ends)."""
    s = re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", s)


def namespace_name(prefix: str, event_id: str) -> str:
    """One namespace per event: the prefix and the event id ("sciorch-evt-0a1b2c3d4e5f")."""
    return dns1123_label(prefix + event_id)


def object_name(entry_id: str) -> str:
    """Every object of an entry is named after it; entry ids ("ent-<hex>") are RFC 1035 labels."""
    return dns1123_label(entry_id)


def params_name(entry_id: str) -> str:
    return object_name(entry_id) + "-params"


def upload_name(entry_id: str) -> str:
    return object_name(entry_id) + "-upload"


# ----------------------------------------------------------------------------- site options


class Toleration(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    tolerationSeconds: int | None = Field(None, ge=0)


class KubernetesOptions(BaseModel):
    """The `[[sites]]` keys a kubernetes site understands."""

    model_config = ConfigDict(extra="forbid")

    # -- connection (host for a bare API server URL, else kubeconfig/context, else in-cluster)
    host: str | None = Field(None, description="API server URL, e.g. https://10.0.0.1:6443")
    kubeconfig: str | None = Field(None, description="kubeconfig file (default: $KUBECONFIG)")
    context: str | None = Field(None, description="kubeconfig context")
    in_cluster: bool = Field(False, description="use the pod's service account")
    token_file: str | None = Field(None, description="bearer token file, with `host`")
    ca_cert: str | None = Field(None, description="CA bundle, with `host`")
    verify_ssl: bool = True
    trust_env: bool | None = Field(
        None, description="honour HTTP(S)_PROXY (default: yes, except for loopback hosts)"
    )
    # -- placement
    namespace_prefix: str = Field("sciorch-", max_length=40)
    image: str = Field("python:3.12-slim", description="image for templates without one")
    python: str = Field("python3", description="replaces the server's {python} in commands")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    image_pull_secrets: list[str] = Field(default_factory=list)
    service_account: str | None = None
    # -- per-user identity (with [sites.accounts]): every call made for an entry impersonates
    # its account, so the cluster's RBAC decides what that user may do
    impersonate: bool = Field(
        False, description="calls for an entry carry Impersonate-User: its account"
    )
    impersonate_groups: list[str] = Field(
        default_factory=list, description="Impersonate-Group headers sent with them"
    )
    priority_class_urgent: str | None = Field(
        None, description="PriorityClass of urgent entries' pods (the cluster admin makes it)"
    )
    priority_class: str | None = Field(None, description="PriorityClass of other entries' pods")
    node_selector: dict[str, str] = Field(default_factory=dict)
    cpu_limit: bool = Field(False, description="also limit CPU (default: request only)")
    service_port: int = Field(8080, ge=1, le=65535, description="port services listen on")
    # -- ingress for services
    ingress_class: str | None = None
    ingress_annotations: dict[str, str] = Field(default_factory=dict)
    ingress_host_template: str | None = Field(
        None, description="host per entry, e.g. '{entry}.apps.example.org'"
    )
    ingress_host: str | None = Field(None, description="one host, a path per entry")
    ingress_path_prefix: str = Field("/sciorch", description="path mode: prefix of the path")
    tls_secret: str | None = Field(None, description="TLS secret name for the ingress")
    endpoint: Literal["auto", "ingress", "service"] = Field(
        "auto", description="what the proxy forwards to: the ingress URL or the cluster service"
    )
    cluster_domain: str = "cluster.local"
    # -- GPUs
    gpu_resource: str = "nvidia.com/gpu"
    gpu_node_selectors: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="GPU type -> node labels, e.g. {a100: {...}}"
    )
    gpu_tolerations: list[Toleration] = Field(default_factory=list)
    # -- job contract
    results_pvc: str | None = Field(
        None, description="PVC for work dirs (default: an emptyDir per pod, results via the log)"
    )
    input_image: str = Field(
        "curlimages/curl:8.11.1", description="init container that downloads a job's inputs"
    )
    # -- capacity (overrides what the node list says)
    max_walltime_s: int | None = Field(None, gt=0)
    cpus: float | None = Field(None, gt=0)
    memory_mb: int | None = Field(None, gt=0)
    gpus: int | None = Field(None, ge=0)
    gpu_types: list[str] | None = None
    # -- timing
    image_pull_grace_s: float = Field(300, ge=0, description="fail an image pull stuck this long")
    unschedulable_grace_s: float | None = Field(
        None, ge=0, description="fail a pod unschedulable this long (default: wait)"
    )
    watch_timeout_s: int = Field(300, ge=1, description="server-side timeout of one watch")
    refresh_s: float = Field(30, gt=0, description="how old the node snapshot may get")
    pending_pod_wait_s: float = Field(60, ge=0, description="queue estimate per pending pod")

    @field_validator("namespace_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if v and not re.fullmatch(r"[a-z0-9]([-a-z0-9]*)?", v):
            raise ValueError("must be lower-case letters, digits and '-', starting alphanumeric")
        return v

    @field_validator("node_selector", "ingress_annotations")
    @classmethod
    def _keys(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            if not is_label_key(key):
                raise ValueError(f"{key!r} is not a valid label/annotation key")
        return v

    @field_validator("gpu_node_selectors")
    @classmethod
    def _gpu_selectors(cls, v: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
        for gpu, labels in v.items():
            for key, value in labels.items():
                if not is_label_key(key) or not is_label_value(value):
                    raise ValueError(f"{gpu}: {key}={value!r} is not a valid node label")
        return v

    @model_validator(mode="after")
    def _check(self) -> KubernetesOptions:
        if self.ingress_host_template and self.ingress_host:
            raise ValueError("set ingress_host_template (host mode) or ingress_host (path mode)")
        if self.ingress_host_template:
            try:
                self.ingress_host_template.format(
                    entry="e", event="v", service="s", namespace="n", site="x"
                )
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(
                    f"ingress_host_template: {exc}; placeholders are {{entry}}, {{event}}, "
                    "{service}, {namespace}, {site}"
                ) from exc
        if not self.ingress_path_prefix.startswith("/"):
            self.ingress_path_prefix = "/" + self.ingress_path_prefix
        self.ingress_path_prefix = self.ingress_path_prefix.rstrip("/")
        if self.endpoint == "ingress" and not (self.ingress_host_template or self.ingress_host):
            raise ValueError("endpoint 'ingress' needs ingress_host_template or ingress_host")
        return self

    @property
    def ingress_enabled(self) -> bool:
        return bool(self.ingress_host_template or self.ingress_host)

    def stuck_grace(self, kind: str, fatal: bool) -> float | None:
        """How long a pod stuck this way ('unschedulable', 'image', ...) is given (None:
        forever; 0 for what never gets better)."""
        if fatal:
            return 0.0
        return self.unschedulable_grace_s if kind == "unschedulable" else self.image_pull_grace_s


# ----------------------------------------------------------------------------- pieces


def labels(spec: LaunchSpec, site: str) -> dict[str, str]:
    """The labels on every object of an entry (and on its pods)."""
    return {
        "app.kubernetes.io/name": label_value(spec.service) or "service",
        "app.kubernetes.io/instance": object_name(spec.entry_id),
        "app.kubernetes.io/component": spec.kind,
        "app.kubernetes.io/part-of": "sciorch",
        MANAGED_BY: MANAGER,
        ENTRY_LABEL: label_value(spec.entry_id),
        EVENT_LABEL: label_value(spec.event_id),
        SITE_LABEL: label_value(site),
    }


def selector_labels(spec: LaunchSpec) -> dict[str, str]:
    """The labels a Deployment and a Service select their pods by (a subset of `labels`)."""
    return {
        "app.kubernetes.io/instance": object_name(spec.entry_id),
        ENTRY_LABEL: label_value(spec.entry_id),
    }


def _meta(name: str, namespace: str, spec: LaunchSpec, site: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": namespace,
        "labels": labels(spec, site),
        "annotations": {"sciorch.io/service": spec.service},
    }


def _cpu(cpus: float) -> str:
    milli = max(1, math.ceil(cpus * 1000 - 1e-6))
    return str(milli // 1000) if milli % 1000 == 0 else f"{milli}m"


def resources(spec: LaunchSpec, opts: KubernetesOptions) -> dict[str, dict[str, str]]:
    res = spec.resources
    requests = {"cpu": _cpu(res.cpus)}
    limits: dict[str, str] = {}
    if opts.cpu_limit:
        limits["cpu"] = requests["cpu"]
    if res.memory_mb > 0:
        requests["memory"] = limits["memory"] = f"{res.memory_mb}Mi"
    if res.gpus:
        # Extended resources: whole numbers, and the request must equal the limit.
        requests[opts.gpu_resource] = limits[opts.gpu_resource] = str(int(res.gpus))
    out = {"requests": requests}
    if limits:
        out["limits"] = limits
    return out


def contract_env(spec: LaunchSpec, opts: KubernetesOptions) -> dict[str, str]:
    root = WORK_ROOT
    env = {
        "SCIORCH_ENTRY_ID": spec.entry_id,
        "SCIORCH_EVENT_ID": spec.event_id,
        "SCIORCH_BASE_PATH": spec.base_path,
        "SCIORCH_WORKDIR": root,
        "SCIORCH_PARAMS": f"{root}/{PARAMS_KEY}",
        "SCIORCH_RESULT": f"{root}/result.json",
        "SCIORCH_RESULTS": f"{root}/result.json",
        "SCIORCH_STREAM": f"{root}/stream.jsonl",
        "SCIORCH_OUTPUT_DIR": f"{root}/output",
        "SCIORCH_INPUTS": f"{root}/{INPUTS_DIR}",
    }
    if spec.kind == "service":
        env["PORT"] = env["SCIORCH_PORT"] = str(opts.service_port)
    return env


def command(spec: LaunchSpec, opts: KubernetesOptions) -> list[str]:
    """The container's argv: the template's command with the server-side {python} replaced by
    the image's python and the backend's placeholders filled; jobs run under the wrapper."""
    env = contract_env(spec, opts)
    values = {
        "port": str(opts.service_port),
        "workdir": env["SCIORCH_WORKDIR"],
        "params_file": env["SCIORCH_PARAMS"],
        "result_file": env["SCIORCH_RESULT"],
        "stream_file": env["SCIORCH_STREAM"],
        "output_dir": env["SCIORCH_OUTPUT_DIR"],
    }
    argv = []
    for arg in spec.argv:
        if arg == sys.executable:
            arg = opts.python
        elif sys.executable in arg:
            arg = arg.replace(sys.executable, opts.python)
        for key, value in values.items():
            arg = arg.replace("{" + key + "}", value)
        argv.append(arg)
    if spec.kind == "job":
        return ["/bin/sh", "-c", JOB_WRAPPER, "sciorch-job", *argv]
    return argv


def container(spec: LaunchSpec, opts: KubernetesOptions) -> dict[str, Any]:
    env = {**spec.env, **contract_env(spec, opts)}
    env_list: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in env.items()]
    if spec.outputs is not None:
        env_list += [
            {"name": "SCIORCH_UPLOAD_URL", "value": spec.outputs.url},
            {"name": "SCIORCH_UPLOAD_PREFIX", "value": spec.outputs.key_prefix},
            {
                "name": "SCIORCH_UPLOAD_FORM",
                "valueFrom": {
                    "secretKeyRef": {"name": upload_name(spec.entry_id), "key": UPLOAD_KEY}
                },
            },
        ]
    c: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image or opts.image,
        "command": command(spec, opts),
        "workingDir": WORK_ROOT,
        "env": env_list,
        "resources": resources(spec, opts),
        "volumeMounts": [
            {"name": "work", "mountPath": WORK_ROOT}
            | ({"subPath": object_name(spec.entry_id)} if opts.results_pvc else {}),
            {
                "name": "params",
                "mountPath": f"{WORK_ROOT}/{PARAMS_KEY}",
                "subPath": PARAMS_KEY,
                "readOnly": True,
            },
        ],
    }
    if opts.image_pull_policy:
        c["imagePullPolicy"] = opts.image_pull_policy
    if spec.kind == "service":
        c["ports"] = [{"name": PORT_NAME, "containerPort": opts.service_port, "protocol": "TCP"}]
        health = spec.health
        path = health.path if health else "/"
        period = max(1, math.ceil(health.interval_s)) if health else 1
        c["readinessProbe"] = {
            "httpGet": {"path": path, "port": PORT_NAME},
            "periodSeconds": period,
            "timeoutSeconds": max(1, min(5, period)),
            "failureThreshold": 3,
        }
    return c


# The init container's script: `stage DEST URL [DEST URL ...]`, each URL (presigned by the
# server's object store) downloaded to DEST under the work dir before the main container runs.
STAGE_SCRIPT = (
    'while [ "$#" -gt 1 ]; do mkdir -p "$(dirname "$1")" && '
    'curl -fsS --retry 3 -o "$1" "$2" || exit 1; shift 2; done'
)


def stage_container(spec: LaunchSpec, opts: KubernetesOptions) -> dict[str, Any] | None:
    """The init container that stages the entry's inputs, None without inputs."""
    args: list[str] = []
    for staged in spec.inputs:
        for f in staged.files:
            rel = f"{staged.name}/{f.path}" if f.path else staged.name
            if f.url is None:
                raise ValueError(f"input {staged.name} has no URL to download it from")
            args += [f"{WORK_ROOT}/{INPUTS_DIR}/{rel}", f.url]
    if not args:
        return None
    return {
        "name": "stage-inputs",
        "image": opts.input_image,
        "command": ["/bin/sh", "-c", STAGE_SCRIPT, "stage", *args],
        "volumeMounts": [
            {"name": "work", "mountPath": WORK_ROOT}
            | ({"subPath": object_name(spec.entry_id)} if opts.results_pvc else {})
        ],
    }


def pod_template(
    spec: LaunchSpec, opts: KubernetesOptions, site: str, restart_policy: str
) -> dict[str, Any]:
    """The pod template of a Job or Deployment: the entry's labels and its pod spec."""
    return {
        "metadata": {"labels": labels(spec, site)},
        "spec": pod_spec(spec, opts, restart_policy),
    }


def pod_spec(
    spec: LaunchSpec, opts: KubernetesOptions, restart_policy: str
) -> dict[str, Any]:
    res = spec.resources
    pod: dict[str, Any] = {
        "restartPolicy": restart_policy,
        "enableServiceLinks": False,
        "containers": [container(spec, opts)],
        "volumes": [
            {"name": "work", "persistentVolumeClaim": {"claimName": opts.results_pvc}}
            if opts.results_pvc
            else {"name": "work", "emptyDir": {}},
            {
                "name": "params",
                "configMap": {
                    "name": params_name(spec.entry_id),
                    "items": [{"key": PARAMS_KEY, "path": PARAMS_KEY}],
                },
            },
        ],
    }
    if (stage := stage_container(spec, opts)) is not None:
        pod["initContainers"] = [stage]
    selector = dict(opts.node_selector)
    if res.gpus and res.gpu_type:
        selector.update(opts.gpu_node_selectors.get(res.gpu_type, {}))
    if selector:
        pod["nodeSelector"] = selector
    if res.gpus and opts.gpu_tolerations:
        pod["tolerations"] = [t.model_dump(exclude_none=True) for t in opts.gpu_tolerations]
    if opts.service_account:
        pod["serviceAccountName"] = opts.service_account
    priority_class = (
        opts.priority_class_urgent if spec.priority == "urgent" else None
    ) or opts.priority_class
    if priority_class:
        pod["priorityClassName"] = priority_class
    if opts.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": s} for s in opts.image_pull_secrets]
    return pod


# ----------------------------------------------------------------------------- objects


def namespace_manifest(event_id: str, site: str, opts: KubernetesOptions) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": namespace_name(opts.namespace_prefix, event_id),
            "labels": {
                "app.kubernetes.io/part-of": "sciorch",
                MANAGED_BY: MANAGER,
                EVENT_LABEL: label_value(event_id),
                SITE_LABEL: label_value(site),
            },
        },
    }


def params_configmap(spec: LaunchSpec, opts: KubernetesOptions, site: str) -> dict[str, Any]:
    ns = namespace_name(opts.namespace_prefix, spec.event_id)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(params_name(spec.entry_id), ns, spec, site),
        "data": {PARAMS_KEY: json.dumps(spec.parameters, sort_keys=True)},
    }


def upload_secret(spec: LaunchSpec, opts: KubernetesOptions, site: str) -> dict[str, Any]:
    """The job's upload form (LaunchSpec.outputs) as `name=value` lines: a credential, so in a
    Secret, not in the pod spec where anyone who may read pods would see it."""
    assert spec.outputs is not None
    ns = namespace_name(opts.namespace_prefix, spec.event_id)
    lines = "".join(f"{k}={v}\n" for k, v in spec.outputs.fields.items())
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(upload_name(spec.entry_id), ns, spec, site),
        "type": "Opaque",
        "data": {UPLOAD_KEY: base64.b64encode(lines.encode()).decode()},
    }


def job_manifest(spec: LaunchSpec, opts: KubernetesOptions, site: str) -> dict[str, Any]:
    ns = namespace_name(opts.namespace_prefix, spec.event_id)
    walltime = spec.resources.walltime_s
    if opts.max_walltime_s is not None:
        walltime = min(walltime, opts.max_walltime_s)
    retries = spec.max_restarts if spec.restart_policy == "on-failure" else 0
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _meta(object_name(spec.entry_id), ns, spec, site),
        "spec": {
            "backoffLimit": int(retries),
            "activeDeadlineSeconds": int(walltime),
            "template": pod_template(spec, opts, site, "Never"),
        },
    }


def deployment_manifest(spec: LaunchSpec, opts: KubernetesOptions, site: str) -> dict[str, Any]:
    ns = namespace_name(opts.namespace_prefix, spec.event_id)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(object_name(spec.entry_id), ns, spec, site),
        "spec": {
            "replicas": 1,
            # One replica that may hold GPUs: never run the old and the new pod side by side.
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": selector_labels(spec)},
            "template": pod_template(spec, opts, site, "Always"),
        },
    }


def service_manifest(spec: LaunchSpec, opts: KubernetesOptions, site: str) -> dict[str, Any]:
    ns = namespace_name(opts.namespace_prefix, spec.event_id)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(object_name(spec.entry_id), ns, spec, site),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(spec),
            "ports": [
                {
                    "name": PORT_NAME,
                    "port": opts.service_port,
                    "targetPort": PORT_NAME,
                    "protocol": "TCP",
                }
            ],
        },
    }


def ingress_host(spec: LaunchSpec, opts: KubernetesOptions, site: str) -> str | None:
    if opts.ingress_host_template:
        return opts.ingress_host_template.format(
            entry=object_name(spec.entry_id),
            event=dns1123_label(spec.event_id),
            service=dns1123_label(spec.service),
            namespace=namespace_name(opts.namespace_prefix, spec.event_id),
            site=dns1123_label(site),
        )
    return opts.ingress_host


def ingress_path(spec: LaunchSpec, opts: KubernetesOptions) -> str:
    if opts.ingress_host_template:
        return "/"
    return f"{opts.ingress_path_prefix}/{object_name(spec.entry_id)}"


def ingress_manifest(spec: LaunchSpec, opts: KubernetesOptions, site: str) -> dict[str, Any]:
    ns = namespace_name(opts.namespace_prefix, spec.event_id)
    name = object_name(spec.entry_id)
    host = ingress_host(spec, opts, site)
    rule: dict[str, Any] = {
        "http": {
            "paths": [
                {
                    "path": ingress_path(spec, opts),
                    "pathType": "Prefix",
                    "backend": {"service": {"name": name, "port": {"name": PORT_NAME}}},
                }
            ]
        }
    }
    if host:
        rule = {"host": host, **rule}
    meta = _meta(name, ns, spec, site)
    meta["annotations"] = {**opts.ingress_annotations, **meta["annotations"]}
    body: dict[str, Any] = {"rules": [rule]}
    if opts.ingress_class:
        body["ingressClassName"] = opts.ingress_class
    if opts.tls_secret and host:
        body["tls"] = [{"hosts": [host], "secretName": opts.tls_secret}]
    return {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": meta, "spec": body}


def build_manifests(spec: LaunchSpec, opts: KubernetesOptions, site: str) -> list[dict[str, Any]]:
    """Every object of one entry (not its namespace), in creation order."""
    out = [params_configmap(spec, opts, site)]
    if spec.kind == "job":
        if spec.outputs is not None:
            out.append(upload_secret(spec, opts, site))
        out.append(job_manifest(spec, opts, site))
    else:
        out += [deployment_manifest(spec, opts, site), service_manifest(spec, opts, site)]
        if opts.ingress_enabled:
            out.append(ingress_manifest(spec, opts, site))
    return out


def object_refs(spec: LaunchSpec, opts: KubernetesOptions) -> list[str]:
    """`Kind/name` of each object `build_manifests` makes, in the same order."""
    name = object_name(spec.entry_id)
    if spec.kind == "job":
        secret = [f"Secret/{upload_name(spec.entry_id)}"] if spec.outputs is not None else []
        return [f"ConfigMap/{params_name(spec.entry_id)}", *secret, f"Job/{name}"]
    refs = [f"ConfigMap/{params_name(spec.entry_id)}", f"Deployment/{name}", f"Service/{name}"]
    return refs + ([f"Ingress/{name}"] if opts.ingress_enabled else [])


def endpoint(spec: LaunchSpec, opts: KubernetesOptions, site: str) -> str:
    """The upstream address the proxy forwards a service's requests to."""
    use_ingress = opts.endpoint == "ingress" or (opts.endpoint == "auto" and opts.ingress_enabled)
    if use_ingress:
        scheme = "https" if opts.tls_secret else "http"
        host = ingress_host(spec, opts, site)
        path = ingress_path(spec, opts).rstrip("/")
        return f"{scheme}://{host}{path}"
    ns = namespace_name(opts.namespace_prefix, spec.event_id)
    name = object_name(spec.entry_id)
    return f"http://{name}.{ns}.svc.{opts.cluster_domain}:{opts.service_port}"


# ----------------------------------------------------------------------------- own checks


def _check_labels(where: str, mapping: Mapping[str, Any] | None, problems: list[str]) -> None:
    for key, value in (mapping or {}).items():
        if not is_label_key(key):
            problems.append(f"{where}: label key {key!r} is not a qualified name")
        if not isinstance(value, str) or not is_label_value(value):
            problems.append(f"{where}: label {key}={value!r} is not a valid label value")


def _check_pod(where: str, pod: Mapping[str, Any], problems: list[str]) -> None:
    seen_ports: set[str] = set()
    containers = list(pod.get("containers") or []) + list(pod.get("initContainers") or [])
    volumes = {v.get("name") for v in pod.get("volumes") or []}
    for v in volumes:
        if not isinstance(v, str) or not is_dns1123_label(v):
            problems.append(f"{where}: volume name {v!r} is not an RFC 1123 label")
    for c in containers:
        cname = c.get("name", "")
        cw = f"{where}.containers[{cname}]"
        if not is_dns1123_label(cname):
            problems.append(f"{cw}: container name {cname!r} is not an RFC 1123 label")
        if not c.get("image"):
            problems.append(f"{cw}: no image")
        for env in c.get("env") or []:
            if not _ENV_NAME_RE.match(env.get("name", "")):
                problems.append(f"{cw}: environment variable name {env.get('name')!r}")
        for port in c.get("ports") or []:
            pname = port.get("name")
            if pname is not None:
                if not is_port_name(pname):
                    problems.append(f"{cw}: port name {pname!r} is not an IANA service name")
                seen_ports.add(pname)
        for m in c.get("volumeMounts") or []:
            if m.get("name") not in volumes:
                problems.append(f"{cw}: mounts volume {m.get('name')!r}, which is not defined")
        res = c.get("resources") or {}
        requests, limits = res.get("requests") or {}, res.get("limits") or {}
        for key in set(requests) | set(limits):
            for kind, values in (("request", requests), ("limit", limits)):
                if key in values and not _QUANTITY_RE.match(str(values[key])):
                    problems.append(f"{cw}: {kind} {key}={values[key]!r} is not a quantity")
            if "/" in key and not key.startswith("kubernetes.io/"):
                # An extended resource (a GPU): whole numbers, request == limit.
                for kind, values in (("request", requests), ("limit", limits)):
                    v = values.get(key)
                    if v is not None and not re.fullmatch(r"[0-9]+", str(v)):
                        problems.append(f"{cw}: {kind} {key}={v!r} must be a whole number")
                if key not in limits:
                    problems.append(f"{cw}: extended resource {key} needs a limit")
                elif key in requests and str(requests[key]) != str(limits[key]):
                    problems.append(
                        f"{cw}: {key} request {requests[key]!r} != limit {limits[key]!r}"
                    )
        probe = c.get("readinessProbe") or {}
        port = (probe.get("httpGet") or {}).get("port")
        if isinstance(port, str) and port not in seen_ports:
            problems.append(f"{cw}: readiness probe uses port {port!r}, which is not declared")
    _check_labels(f"{where}.nodeSelector", pod.get("nodeSelector"), problems)


def _selector_matches(selector: Mapping[str, Any], pod_labels: Mapping[str, str]) -> bool:
    match = selector.get("matchLabels", selector)
    return bool(match) and all(pod_labels.get(k) == v for k, v in match.items())


def check_manifest(obj: Mapping[str, Any]) -> list[str]:
    """What a schema does not catch in one object; empty when it is fine."""
    problems: list[str] = []
    kind = obj.get("kind", "?")
    meta = obj.get("metadata") or {}
    name = meta.get("name", "")
    where = f"{kind}/{name}"
    if kind in ("Namespace",):
        if not is_dns1123_label(name):
            problems.append(f"{where}: name is not an RFC 1123 label")
    elif kind == "Service":
        if not is_dns1035_label(name):
            problems.append(f"{where}: name is not an RFC 1035 label")
    elif kind in ("Job", "Deployment"):
        # Their names end up in pod names and the job-name label: keep them labels.
        if not is_dns1123_label(name):
            problems.append(f"{where}: name is not an RFC 1123 label")
    elif not is_dns1123_subdomain(name):
        problems.append(f"{where}: name is not an RFC 1123 subdomain")
    ns = meta.get("namespace")
    if kind != "Namespace" and (ns is None or not is_dns1123_label(ns)):
        problems.append(f"{where}: namespace {ns!r} is not an RFC 1123 label")
    _check_labels(where, meta.get("labels"), problems)
    for key in meta.get("annotations") or {}:
        if not is_label_key(key):
            problems.append(f"{where}: annotation key {key!r} is not a qualified name")
    spec = obj.get("spec") or {}
    if kind in ("Job", "Deployment"):
        template = spec.get("template") or {}
        tlabels = (template.get("metadata") or {}).get("labels") or {}
        _check_labels(f"{where}.template", tlabels, problems)
        _check_pod(f"{where}.template", template.get("spec") or {}, problems)
        selector = spec.get("selector")
        if kind == "Deployment" and not selector:
            problems.append(f"{where}: no selector")
        if selector is not None and not _selector_matches(selector, tlabels):
            problems.append(f"{where}: selector {selector} does not match the template's labels")
        policy = (template.get("spec") or {}).get("restartPolicy")
        if kind == "Deployment" and policy not in (None, "Always"):
            problems.append(f"{where}: a Deployment's pods must restart Always, not {policy}")
        if kind == "Job" and policy not in ("Never", "OnFailure"):
            problems.append(f"{where}: a Job's pods must restart Never or OnFailure")
    if kind == "Service":
        for port in spec.get("ports") or []:
            pname = port.get("name")
            if pname is not None and not is_port_name(pname):
                problems.append(f"{where}: port name {pname!r} is not an IANA service name")
        _check_labels(f"{where}.selector", spec.get("selector"), problems)
    if kind == "Ingress":
        for rule in spec.get("rules") or []:
            host = rule.get("host")
            if host is not None and not is_dns1123_subdomain(host.removeprefix("*.")):
                problems.append(f"{where}: host {host!r} is not a DNS name")
    if kind == "ConfigMap":
        for key in obj.get("data") or {}:
            if not re.fullmatch(r"[-._a-zA-Z0-9]+", key) or len(key) > 253:
                problems.append(f"{where}: data key {key!r} is not a valid key")
    return problems


def check_bundle(objs: Iterable[Mapping[str, Any]]) -> list[str]:
    """`check_manifest` for each object, plus the references between them: a Service selects
    the pods of a workload in the bundle, an Ingress points at a Service port that exists, a
    pod's ConfigMap volume names a ConfigMap of the bundle, a secretKeyRef a Secret of it."""
    items = list(objs)
    problems = [p for obj in items for p in check_manifest(obj)]
    by_kind: dict[str, list[Mapping[str, Any]]] = {}
    for obj in items:
        by_kind.setdefault(str(obj.get("kind")), []).append(obj)
    namespaces = {str(ns) for o in items if (ns := (o.get("metadata") or {}).get("namespace"))}
    if len(namespaces) > 1:
        problems.append(f"objects span namespaces {sorted(namespaces)}")
    templates = [
        (o.get("spec") or {}).get("template") or {}
        for o in by_kind.get("Deployment", []) + by_kind.get("Job", [])
    ]
    pod_labels = [(t.get("metadata") or {}).get("labels") or {} for t in templates]
    configmaps = {(o.get("metadata") or {}).get("name") for o in by_kind.get("ConfigMap", [])}
    for t in templates:
        for vol in (t.get("spec") or {}).get("volumes") or []:
            cm = (vol.get("configMap") or {}).get("name")
            if cm is not None and cm not in configmaps:
                problems.append(f"volume {vol.get('name')!r} uses ConfigMap {cm!r}, not defined")
        secrets = {(o.get("metadata") or {}).get("name") for o in by_kind.get("Secret", [])}
        for c in (t.get("spec") or {}).get("containers") or []:
            for env in c.get("env") or []:
                ref = (env.get("valueFrom") or {}).get("secretKeyRef") or {}
                if ref and ref.get("name") not in secrets:
                    problems.append(
                        f"env {env.get('name')!r} uses Secret {ref.get('name')!r}, not defined"
                    )
    services: dict[str, set[str]] = {}
    for svc in by_kind.get("Service", []):
        sname = (svc.get("metadata") or {}).get("name", "")
        spec = svc.get("spec") or {}
        selector = spec.get("selector") or {}
        if not any(_selector_matches(selector, pl) for pl in pod_labels):
            problems.append(f"Service/{sname}: selector {selector} matches no pod template")
        services[sname] = {str(p.get("name")) for p in spec.get("ports") or []} | {
            str(p.get("port")) for p in spec.get("ports") or []
        }
    for ing in by_kind.get("Ingress", []):
        iname = (ing.get("metadata") or {}).get("name", "")
        for rule in (ing.get("spec") or {}).get("rules") or []:
            for path in (rule.get("http") or {}).get("paths") or []:
                backend = (path.get("backend") or {}).get("service") or {}
                target = backend.get("name")
                port = backend.get("port") or {}
                pkey = str(port.get("name") or port.get("number"))
                if target not in services:
                    problems.append(f"Ingress/{iname}: backend Service {target!r} not defined")
                elif pkey not in services[target]:
                    problems.append(f"Ingress/{iname}: Service {target} has no port {pkey!r}")
    return problems


__all__ = [
    "CONTAINER",
    "JOB_WRAPPER",
    "MARK",
    "KubernetesOptions",
    "build_manifests",
    "check_bundle",
    "check_manifest",
    "endpoint",
    "namespace_manifest",
    "namespace_name",
    "object_name",
    "object_refs",
]
