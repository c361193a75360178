"""Urgent work on a Kubernetes site: its pods carry the site's urgent PriorityClass (the
manifests as the backend sends them, checked against the Kubernetes schemas)."""

from __future__ import annotations

import kubernetes_validate

from backends.kube_manifests import KubernetesOptions, job_manifest
from tests.test_kubernetes import K8S_VERSION, spec


def test_urgent_pods_carry_the_urgent_priority_class() -> None:
    opts = KubernetesOptions(priority_class_urgent="sciorch-urgent", priority_class="batch")
    urgent = job_manifest(spec(priority="urgent"), opts, "spin")
    normal = job_manifest(spec(), opts, "spin")
    for job in (urgent, normal):
        assert kubernetes_validate.validate(job, K8S_VERSION, strict=True) == K8S_VERSION
    assert urgent["spec"]["template"]["spec"]["priorityClassName"] == "sciorch-urgent"
    assert normal["spec"]["template"]["spec"]["priorityClassName"] == "batch"
    plain = job_manifest(spec(priority="urgent"), KubernetesOptions(), "spin")
    assert "priorityClassName" not in plain["spec"]["template"]["spec"]
