"""The Helm chart's values (``helm/values.yaml``): the Serve args of ``configs/`` plus the Kubernetes cluster around
them. ``helm/values.schema.json`` is generated from these models, so Helm rejects a bad value with the same rules
that reject it in a config file:

    python -m deployments.kubernetes > helm/values.schema.json     # after changing a model here or in config.py

``serve`` is exactly a config file's ``applications[0].args`` (:class:`deployments.config.ServeArgs`); the chart
renders it into the RayService's ``serveConfigV2``. Everything else is named the Kubernetes way (camelCase), and
what is plain Kubernetes (resources, tolerations, affinity, security contexts) is passed through unchanged and
checked against Kubernetes' own schemas when the chart is tested.

Each model's replicas are Ray placement groups (see :class:`deployments.config.Resources`); the Ray autoscaler
adds pods to the worker group that can hold them, so a model that needs 2 GPUs per replica needs a worker group
whose pods have 2. The chart fails to render when no group fits, instead of leaving replicas pending forever.
"""

from __future__ import annotations

import copy
import json
import sys
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deployments.api_keys import ApiKey
from deployments.config import ServeArgs

# The Ray resource only the router pods have; the routers ask for it (``serve.routers.ray_resources``).
ROUTER_RESOURCE = "rayroute_router"
# The worker group of the router pods (``routerPods``); GPU groups may not take the name.
ROUTER_GROUP = "routers"
# How long a router replica takes to start elsewhere when its pod drains (the chart's grace period adds the models'
# longest drain_timeout_s): no weights to load, so far less than an engine's workerDefaults.replicaStartSeconds.
ROUTER_START_SECONDS = 120

# Variables `env` may not set. KubeRay leaves a Ray container's RAY_AUTH_* alone when the pod spec already has them,
# so one in `env` would turn token authentication off; HF_TOKEN belongs to the GPU pods only; HAProxy's admin pages
# stay on the loopback. The chart's templates refuse them too ("rayroute.checkEnv").
RESERVED_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "HF_TOKEN", "RAYROUTE_HAPROXY_PAGES_HOST")

_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_Object = dict[str, Any]


class _Values(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Image(_Values):
    repository: str = Field("", description="The rayroute image (helm/image/Dockerfile): Ray, vLLM and rayroute. "
                            "Required.")
    tag: str = Field("", description="Defaults to the chart's appVersion.")
    pullPolicy: Literal["IfNotPresent", "Always", "Never"] = "IfNotPresent"
    pullSecrets: list[str] = Field(default_factory=list, description="Names of image pull Secrets.")


class ApiKeys(_Values):
    """Keys reach the router as a file mounted from a Secret on the router pods only (the routers run there)."""

    existingSecret: str = Field("", description="A Secret holding the keys file (a YAML list of keys, the format "
                                "of RAYROUTE_API_KEYS_FILE). Takes precedence over `keys`.")
    secretKey: str = Field("api-keys.yaml", description="The Secret's key that holds the file.")
    keys: list[ApiKey] = Field(default_factory=list, description="Keys for a Secret the chart creates.")
    allowUnauthenticated: bool = Field(False, description="Serve without keys. Off: the chart refuses to render "
                                       "an endpoint anyone can call.")


class HuggingFace(_Values):
    """``HF_TOKEN`` reaches the GPU worker pods only, where the engines download weights; never the pods that
    face clients (routers) or run Ray's control plane (head)."""

    existingSecret: str = Field("", description="A Secret holding a Hugging Face token, for gated models.")
    secretKey: str = Field("token")
    token: str = Field("", description="A token for a Secret the chart creates (prefer existingSecret).")


class RayAuth(_Values):
    """Ray's token authentication (KubeRay's `authOptions: {mode: token}`), always on: without it anyone who reaches
    Ray's ports (GCS, the dashboard's job API, a replica's gRPC server) runs code in the cluster. KubeRay (1.5.1 or
    later) puts the token in every Ray container's environment."""

    existingSecret: str = Field("", description="A Secret holding the token under the key `auth_token`; empty: "
                                "KubeRay makes a Secret with a random token for each RayCluster.")


# Where a pod may not send its traffic when a policy lets it reach "the internet" on 443: private, loopback,
# link-local (cloud metadata endpoints: 169.254.169.254, fd00:ec2::254, fd20:ce::254) and carrier-grade NAT ranges,
# where the cluster's own nodes, Services and neighbours live.
PRIVATE_IPV4 = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8", "169.254.0.0/16", "100.64.0.0/10"]
PRIVATE_IPV6 = ["fc00::/7", "fe80::/10", "::1/128"]
PUBLIC_HTTPS = {
    "to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": PRIVATE_IPV4}},
           {"ipBlock": {"cidr": "::/0", "except": PRIVATE_IPV6}}],
    "ports": [{"protocol": "TCP", "port": 443}],
}


class NetworkPolicies(_Values):
    """Kubernetes NetworkPolicies around the release's pods (they need a CNI that enforces them). Ray's ports are
    open to the release's own pods only, plus KubeRay's operator and Prometheus on the ports they use; the API port
    on the pods that serve HTTP; GPU pods may send only to DNS, the release's pods and `engineEgress`. Each `*From`
    is a list of NetworkPolicy peers (`podSelector`, `namespaceSelector`, `ipBlock`)."""

    enabled: bool = True
    apiFrom: list[_Object] = Field(default_factory=list, description="Who may call the API (port 8000 of the "
                                   "router and GPU pods); empty: anyone, e.g. a LoadBalancer's clients.")
    operatorFrom: list[_Object] = Field(default_factory=lambda: [{
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}],
        description="KubeRay's operator, which deploys serveConfigV2 and reads status through the head's "
        "dashboard (8265) and may check Serve's proxy (8000); empty: nobody outside the release.")
    metricsFrom: list[_Object] = Field(default_factory=lambda: [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
        description="Prometheus, on Ray's metrics port (8080); empty: nobody outside the release.")
    engineEgress: list[_Object] = Field(
        default_factory=lambda: [copy.deepcopy(PUBLIC_HTTPS)],
        description="NetworkPolicy egress rules (`to`, `ports`) for where GPU pods fetch weights, adapters, pip "
        "packages and clients' media URLs, besides DNS and the release's pods. Default: HTTPS to public addresses "
        "only. Router pods get them too when a CPU model (which may run there) or `python.packages` is configured.")


class HAProxy(_Values):
    """Serve's HTTP front on every pod. Its stats page (admin level) and metrics page listen on the pod's
    loopback only (the image patches Ray's template: router/haproxy.py)."""

    requestTimeoutSeconds: int = Field(10, ge=1, le=3600, description="HAProxy's `timeout http-request`: how "
                                       "long a client has to send a request's headers, so connections that "
                                       "trickle them cannot hold every connection slot.")


class _Placement(_Values):
    """Where a group's pods go and what they carry, passed to Kubernetes unchanged."""

    nodeSelector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[_Object] = Field(default_factory=list)
    affinity: _Object = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class Head(_Placement):
    """The head pod: Ray's control plane and Serve's controller only; no replica, no HTTP traffic."""

    resources: _Object = Field(default_factory=lambda: {
        "requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"cpu": "2", "memory": "8Gi"}})


class RouterPods(_Placement):
    """The router pods: a CPU worker group holding the routers (pinned by the `rayroute_router` Ray resource),
    the key-limits replica and an HTTP proxy beside them; the Service sends clients here and never to the head."""

    replicas: int = Field(2, ge=1, le=100, description="Pods, spread over Kubernetes nodes where the scheduler can.")
    resources: _Object = Field(default_factory=lambda: {
        "requests": {"cpu": "4", "memory": "8Gi"}, "limits": {"cpu": "4", "memory": "8Gi"}},
        description="Each router replica takes one CPU: `serve.routers.replicas` must fit on these pods.")


class GcsFaultTolerance(_Values):
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


class WorkerSettings(_Values):
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
    resources: _Object = Field(default_factory=lambda: {
        "requests": {"cpu": "8", "memory": "32Gi"}, "limits": {"cpu": "8", "memory": "32Gi"}},
        description="CPU and memory; the chart adds the `nvidia.com/gpu` limit from `gpus`.")
    nodeSelector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[_Object] = Field(default_factory=lambda: [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])
    affinity: _Object = Field(default_factory=dict)
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


class Autoscaler(_Values):
    """Ray's autoscaler, which adds and removes worker pods as Serve asks for replicas."""

    idleTimeoutSeconds: int = Field(300, ge=0, description="How long a worker pod sits idle before removal.")
    upscalingMode: Literal["Default", "Aggressive", "Conservative"] = "Default"
    resources: _Object = Field(default_factory=lambda: {
        "requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"cpu": "500m", "memory": "512Mi"}})


class Service(_Values):
    """The OpenAI API's Service. Its port is 8000: KubeRay takes it from the head's `serve` container port and
    ignores another one written in the RayService."""

    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    annotations: dict[str, str] = Field(default_factory=dict)


class IngressHost(_Values):
    host: str
    path: str = "/"


class IngressTLS(_Values):
    secretName: str
    hosts: list[str] = Field(min_length=1)


# Without these, ingress-nginx cuts a stream after 60 s of silence and buffers it, and rejects bodies over 1 MiB.
NGINX_STREAMING_ANNOTATIONS = {
    "nginx.ingress.kubernetes.io/proxy-read-timeout": "3600",
    "nginx.ingress.kubernetes.io/proxy-send-timeout": "3600",
    "nginx.ingress.kubernetes.io/proxy-buffering": "off",
    "nginx.ingress.kubernetes.io/proxy-body-size": "16m",
}


class IngressResource(_Values):
    """A Kubernetes Ingress in front of the Service (not `serve.routers`)."""

    enabled: bool = False
    className: str = ""
    annotations: dict[str, str] = Field(default_factory=lambda: dict(NGINX_STREAMING_ANNOTATIONS))
    hosts: list[IngressHost] = Field(default_factory=list)
    tls: list[IngressTLS] = Field(default_factory=list)


class HTTPRoute(_Values):
    """A Gateway API route; TLS is the Gateway's listener's business."""

    enabled: bool = False
    parentRefs: list[_Object] = Field(default_factory=list, description="The Gateway(s), e.g. `[{name: web}]`.")
    hostnames: list[str] = Field(default_factory=list)
    requestTimeout: str = Field("0s", pattern=r"^([0-9]{1,5}(h|m|s|ms)){1,4}$",
                                description="Gateway API duration; `0s` turns the timeout off, so long streams "
                                "are not cut.")


class ScrapeMonitor(_Values):
    enabled: bool = False
    interval: str = "15s"
    labels: dict[str, str] = Field(default_factory=dict, description="Labels your Prometheus selects monitors by.")


class Dashboard(_Values):
    enabled: bool = True
    labels: dict[str, str] = Field(default_factory=lambda: {"grafana_dashboard": "1"},
                                   description="The label Grafana's dashboard sidecar watches.")
    annotations: dict[str, str] = Field(default_factory=dict, description="E.g. `grafana_folder: LLM`.")
    namespace: str = Field("", description="Where the ConfigMap goes when Grafana's sidecar watches one namespace "
                           "(e.g. `monitoring`); default: the release's.")


class Monitoring(_Values):
    podMonitor: ScrapeMonitor = Field(default_factory=lambda: ScrapeMonitor(enabled=True))
    serviceMonitor: ScrapeMonitor = Field(default_factory=ScrapeMonitor)
    dashboard: Dashboard = Field(default_factory=Dashboard)


class DisruptionBudget(_Values):
    enabled: bool = True
    maxUnavailable: int = Field(1, ge=0, description="GPU worker pods a node drain may take at once; router pods "
                                "have a budget of their own, one at a time.")


class ModelCache(_Values):
    """Where engines keep downloaded weights (``HF_HOME``); shared, so a new replica does not download again."""

    enabled: bool = False
    existingClaim: str = ""
    size: str = "200Gi"
    storageClassName: str | None = None
    accessModes: list[Literal["ReadWriteOnce", "ReadWriteMany", "ReadOnlyMany", "ReadWriteOncePod"]] = Field(
        default_factory=lambda: ["ReadWriteMany"], min_length=1)
    mountPath: str = "/home/ray/.cache/huggingface"


class Python(_Values):
    packages: list[str] = Field(default_factory=list, description="Extra pip packages for the application "
                                "(a Ray runtime_env); the image already holds Ray, vLLM and rayroute.")


class ChartValues(_Values):
    image: Image = Field(default_factory=Image)
    serve: ServeArgs = Field(description="The application's args: the same schema as `configs/*.yaml`.")
    upgradeStrategy: Literal["NewCluster", "None"] = Field(
        "NewCluster", description="What KubeRay does when the cluster spec changes (Serve config changes are "
        "applied in place either way).")
    python: Python = Field(default_factory=Python)
    env: list[_Object] = Field(default_factory=list, description="Extra environment variables for every Ray pod; "
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
    podSecurityContext: _Object = Field(default_factory=lambda: {
        "runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 100, "fsGroup": 100,
        "seccompProfile": {"type": "RuntimeDefault"}},
        description="The Ray images run as `ray` (uid 1000, group users 100).")
    securityContext: _Object = Field(default_factory=lambda: {
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
