"""The Helm chart's values (``helm/values.yaml``): the Serve args of ``configs/`` plus the Kubernetes cluster around
them. ``helm/values.schema.json`` is generated from these models, so Helm rejects a bad value with the same rules
that reject it in a config file. After changing a model here, in ``security_values.py`` or the config schema:

    python -m deployments.kubernetes.chart_values > helm/values.schema.json     # what `make chart-schema` runs

``serve`` is exactly a config file's ``applications[0].args`` (:class:`deployments.config.ServeArgs`); the chart
renders it into the RayService's ``serveConfigV2``. Everything else is named the Kubernetes way (camelCase), and
what is plain Kubernetes (resources, tolerations, affinity, security contexts) is passed through unchanged and
checked against Kubernetes' own schemas when the chart is tested.

Each model's replicas are Ray placement groups (see :class:`deployments.replica_resources.Resources`); the Ray
autoscaler adds pods to the group that can hold them, so a model whose pipeline stage needs 2 GPUs needs a group
whose pods have 2, and pods for all its stages. The chart refuses values no group fits (their replicas would pend).

The values that guard the cluster (secrets, network policies, HAProxy's pages, reserved variables) are in
:mod:`deployments.kubernetes.security_values`; here are the pods, their exposure and monitoring, and the whole.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Literal

from pydantic import Field, model_validator

from deployments.config import ServeArgs
from deployments.kubernetes.security_values import (
    RESERVED_ENV,
    ApiKeys,
    HAProxy,
    HuggingFace,
    KubeObject,
    NetworkPolicies,
    RayAuth,
    Section,
)

# The Ray resource only the router pods have; the routers ask for it (``serve.routers.ray_resources``).
ROUTER_RESOURCE = "rayroute_router"
# The worker group of the router pods (``routerPods``); GPU groups may not take the name.
ROUTER_GROUP = "routers"
# How long a router replica takes to start elsewhere when its pod drains (the chart's grace period adds the models'
# longest drain_timeout_s): no weights to load, so far less than an engine's workerDefaults.replicaStartSeconds.
ROUTER_START_SECONDS = 120

_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class Image(Section):
    repository: str = Field("", description="The rayroute image (helm/image/Dockerfile): Ray, vLLM and rayroute. "
                            "Required.")
    tag: str = Field("", description="Defaults to the chart's appVersion.")
    pullPolicy: Literal["IfNotPresent", "Always", "Never"] = "IfNotPresent"
    pullSecrets: list[str] = Field(default_factory=list, description="Names of image pull Secrets.")


class _Placement(Section):
    """Where a group's pods go and what they carry, passed to Kubernetes unchanged."""

    nodeSelector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[KubeObject] = Field(default_factory=list)
    affinity: KubeObject = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class Head(_Placement):
    """The head pod: Ray's control plane and Serve's controller only; no replica, no HTTP traffic."""

    resources: KubeObject = Field(default_factory=lambda: {
        "requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"cpu": "2", "memory": "8Gi"}})


class RouterPods(_Placement):
    """The router pods: a CPU worker group holding the routers (pinned by the `rayroute_router` Ray resource),
    the key-limits replica and an HTTP proxy beside them; the Service sends clients here and never to the head."""

    replicas: int = Field(2, ge=1, le=100, description="Pods, spread over Kubernetes nodes where the scheduler can.")
    resources: KubeObject = Field(default_factory=lambda: {
        "requests": {"cpu": "4", "memory": "8Gi"}, "limits": {"cpu": "4", "memory": "8Gi"}},
        description="Each router replica takes one CPU: `serve.routers.replicas` must fit on these pods.")


class GcsFaultTolerance(Section):
    """Ray's control plane (the GCS) keeps its state in an external Redis, so a restarted head picks the cluster
    up where it was: the worker pods and their replicas keep serving meanwhile (KubeRay's
    `gcsFaultToleranceOptions`). The chart does not run Redis: use a managed one (ElastiCache, Memorystore, Azure
    Cache) or your own HA Redis."""

    redisAddress: str = Field("", description="`host:port` of the Redis; empty: fault tolerance off (the head's "
                              "loss restarts the whole cluster).")
    existingSecret: str = Field("", description="A Secret holding the Redis password (empty: no password).")
    secretKey: str = Field("password", description="The Secret's key that holds the password.")
    externalStorageNamespace: str = Field("", description="Leave empty: KubeRay then uses each RayCluster's uid, "
                                          "so the new cluster of an upgrade (`upgradeStrategy: NewCluster`) never "
                                          "reads the old one's state. A fixed value shares one state between them.")


class WorkerSettings(Section):
    """A GPU worker group's pods; ``workerDefaults`` holds these, and each ``workerGroups`` entry overrides any."""

    gpus: int = Field(1, ge=0, le=16, description="`nvidia.com/gpu` per pod; Ray's GPUs on that node.")
    acceleratorType: str | None = Field(None, description="The GPU model (e.g. `L4`, `A100`): models that set "
                                        "`resources.accelerator_type` to it are placed on this group.")
    minReplicas: int = Field(0, ge=0)
    maxReplicas: int = Field(1, ge=1)
    sharedMemory: str = Field("8Gi", description="Size of /dev/shm: tensor-parallel workers and Ray's object "
                              "store share memory through it, and a container's default is 64 MiB.")
    replicaStartSeconds: int = Field(600, ge=0, description="How long a replica takes to start elsewhere (weights "
                                     "downloaded and loaded) when a pod of this group drains before it stops; with "
                                     "the models' longest `drain_timeout_s`, the pod's grace period.")
    resources: KubeObject = Field(default_factory=lambda: {
        "requests": {"cpu": "8", "memory": "32Gi"}, "limits": {"cpu": "8", "memory": "32Gi"}},
        description="CPU and memory; the chart adds the `nvidia.com/gpu` limit from `gpus`.")
    nodeSelector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[KubeObject] = Field(default_factory=lambda: [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])
    affinity: KubeObject = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _bounds(self) -> WorkerSettings:
        if self.minReplicas > self.maxReplicas:
            raise ValueError(f"minReplicas ({self.minReplicas}) exceeds maxReplicas ({self.maxReplicas})")
        return self


class WorkerGroup(WorkerSettings):
    name: str = Field(pattern=_DNS_LABEL, max_length=40, description="The Ray worker group's name.")

    @classmethod
    def from_values(cls, entry: dict[str, Any], defaults: dict[str, Any]) -> WorkerGroup:
        """The group the chart renders: each top-level setting from the entry, else from ``workerDefaults``
        (whole values, not merged: a group's own ``resources`` replace the default ones entirely)."""
        return cls.model_validate({**defaults, **entry})


class Autoscaler(Section):
    """Ray's autoscaler, which adds and removes worker pods as Serve asks for replicas."""

    idleTimeoutSeconds: int = Field(300, ge=0, description="How long a worker pod sits idle before removal.")
    upscalingMode: Literal["Default", "Aggressive", "Conservative"] = "Default"
    resources: KubeObject = Field(default_factory=lambda: {
        "requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"cpu": "500m", "memory": "512Mi"}})


class Service(Section):
    """The OpenAI API's Service. Its port is 8000: KubeRay takes it from the head's `serve` container port and
    ignores another one written in the RayService."""

    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    annotations: dict[str, str] = Field(default_factory=dict)


class IngressHost(Section):
    host: str
    path: str = "/"


class IngressTLS(Section):
    secretName: str
    hosts: list[str] = Field(min_length=1)


# Without these, ingress-nginx cuts a stream after 60 s of silence and buffers it, and rejects bodies over 1 MiB.
NGINX_STREAMING_ANNOTATIONS = {
    "nginx.ingress.kubernetes.io/proxy-read-timeout": "3600",
    "nginx.ingress.kubernetes.io/proxy-send-timeout": "3600",
    "nginx.ingress.kubernetes.io/proxy-buffering": "off",
    "nginx.ingress.kubernetes.io/proxy-body-size": "16m",
}


class IngressResource(Section):
    """A Kubernetes Ingress in front of the Service (not `serve.routers`)."""

    enabled: bool = False
    className: str = ""
    annotations: dict[str, str] = Field(default_factory=lambda: dict(NGINX_STREAMING_ANNOTATIONS))
    hosts: list[IngressHost] = Field(default_factory=list)
    tls: list[IngressTLS] = Field(default_factory=list)


class HTTPRoute(Section):
    """A Gateway API route; TLS is the Gateway's listener's business."""

    enabled: bool = False
    parentRefs: list[KubeObject] = Field(default_factory=list, description="The Gateway(s), e.g. `[{name: web}]`.")
    hostnames: list[str] = Field(default_factory=list)
    requestTimeout: str = Field("0s", pattern=r"^([0-9]{1,5}(h|m|s|ms)){1,4}$",
                                description="Gateway API duration; `0s` turns the timeout off, so long streams "
                                "are not cut.")


class ScrapeMonitor(Section):
    enabled: bool = False
    interval: str = "15s"
    labels: dict[str, str] = Field(default_factory=dict, description="Labels your Prometheus selects monitors by.")


class Dashboard(Section):
    enabled: bool = True
    labels: dict[str, str] = Field(default_factory=lambda: {"grafana_dashboard": "1"},
                                   description="The label Grafana's dashboard sidecar watches.")
    annotations: dict[str, str] = Field(default_factory=dict, description="E.g. `grafana_folder: LLM`.")
    namespace: str = Field("", description="Where the ConfigMap goes when Grafana's sidecar watches one namespace "
                           "(e.g. `monitoring`); default: the release's.")


class Monitoring(Section):
    podMonitor: ScrapeMonitor = Field(default_factory=lambda: ScrapeMonitor(enabled=True))
    serviceMonitor: ScrapeMonitor = Field(default_factory=ScrapeMonitor)
    dashboard: Dashboard = Field(default_factory=Dashboard)


class DisruptionBudget(Section):
    enabled: bool = True
    maxUnavailable: int = Field(1, ge=0, description="GPU worker pods a node drain may take at once; router pods "
                                "have a budget of their own, one at a time.")


class ModelCache(Section):
    """Where engines keep downloaded weights (``HF_HOME``); shared, so a new replica does not download again."""

    enabled: bool = False
    existingClaim: str = ""
    size: str = "200Gi"
    storageClassName: str | None = None
    accessModes: list[Literal["ReadWriteOnce", "ReadWriteMany", "ReadOnlyMany", "ReadWriteOncePod"]] = Field(
        default_factory=lambda: ["ReadWriteMany"], min_length=1)
    mountPath: str = "/home/ray/.cache/huggingface"


class Python(Section):
    packages: list[str] = Field(default_factory=list, description="Extra pip packages for the application "
                                "(a Ray runtime_env); the image already holds Ray, vLLM and rayroute.")


class ChartValues(Section):
    image: Image = Field(default_factory=Image)
    serve: ServeArgs = Field(description="The application's args: the same schema as `configs/*.yaml`.")
    upgradeStrategy: Literal["NewCluster", "None"] = Field(
        "NewCluster", description="What KubeRay does when the cluster spec changes (Serve config changes are "
        "applied in place either way).")
    python: Python = Field(default_factory=Python)
    env: list[KubeObject] = Field(default_factory=list, description="Extra environment variables for every Ray pod; "
                               f"not {', '.join(RESERVED_ENV)}, which the chart sets.")
    apiKeys: ApiKeys = Field(default_factory=ApiKeys)
    huggingface: HuggingFace = Field(default_factory=HuggingFace)
    rayAuth: RayAuth = Field(default_factory=RayAuth)
    networkPolicy: NetworkPolicies = Field(default_factory=NetworkPolicies)
    haproxy: HAProxy = Field(default_factory=HAProxy)
    head: Head = Field(default_factory=Head)
    routerPods: RouterPods = Field(default_factory=RouterPods)
    gcsFaultTolerance: GcsFaultTolerance = Field(default_factory=GcsFaultTolerance)
    workerDefaults: WorkerSettings = Field(default_factory=WorkerSettings)
    workerGroups: list[WorkerGroup] = Field(default_factory=list, description="Each entry: a name, and any "
                                            "setting of workerDefaults to override.")
    autoscaler: Autoscaler = Field(default_factory=Autoscaler)
    service: Service = Field(default_factory=Service)
    ingress: IngressResource = Field(default_factory=IngressResource)
    httpRoute: HTTPRoute = Field(default_factory=HTTPRoute)
    monitoring: Monitoring = Field(default_factory=Monitoring)
    podDisruptionBudget: DisruptionBudget = Field(default_factory=DisruptionBudget)
    modelCache: ModelCache = Field(default_factory=ModelCache)
    podSecurityContext: KubeObject = Field(default_factory=lambda: {
        "runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 100, "fsGroup": 100,
        "seccompProfile": {"type": "RuntimeDefault"}},
        description="The Ray images run as `ray` (uid 1000, group users 100).")
    securityContext: KubeObject = Field(default_factory=lambda: {
        "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}})

    @model_validator(mode="after")
    def _reserved_env(self) -> ChartValues:
        if taken := sorted({item.get("name") for item in self.env} & set(RESERVED_ENV)):
            raise ValueError(f"env: {', '.join(taken)} are the chart's to set")
        return self

    @model_validator(mode="after")
    def _unique_groups(self) -> ChartValues:
        names = [group.name for group in self.workerGroups]
        if len(set(names)) != len(names):
            raise ValueError("workerGroups names must be unique")
        if ROUTER_GROUP in names:
            raise ValueError(f"workerGroups: `{ROUTER_GROUP}` is the router pods' group (routerPods)")
        return self


def values_json_schema() -> dict[str, Any]:
    """The chart's ``values.schema.json``."""
    schema = ChartValues.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


if __name__ == "__main__":
    json.dump(values_json_schema(), sys.stdout, indent=2)
    sys.stdout.write("\n")
