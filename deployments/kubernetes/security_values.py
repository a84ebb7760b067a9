"""The security-facing part of the Helm chart's values (:mod:`deployments.kubernetes.chart_values` holds the rest and
generates the schema): the secrets (API keys, Hugging Face token, Ray's token) and which pods get them, the
NetworkPolicies around the release's pods, HAProxy's admin pages, and the variables ``env`` may not override. Kept
apart so what guards the cluster reads in one place.

Also the base every values model derives from (:class:`Section`), since both modules' models need it and this one
is the one ``chart_values`` imports.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from deployments.api_keys import ApiKey

# Variables `env` may not set. KubeRay leaves a Ray container's RAY_AUTH_* alone when the pod spec already has them,
# so one in `env` would turn token authentication off; HF_TOKEN belongs to the GPU pods only; HAProxy's admin pages
# stay on the loopback. The chart's templates refuse them too ("rayroute.checkEnv").
RESERVED_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "HF_TOKEN", "RAYROUTE_HAPROXY_PAGES_HOST")

KubeObject = dict[str, Any]  # plain Kubernetes (a NetworkPolicy peer, resources, ...), checked by Kubernetes' schemas


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ApiKeys(Section):
    """Keys reach the router as a file mounted from a Secret on the router pods only (the routers run there)."""

    existingSecret: str = Field("", description="A Secret holding the keys file (a YAML list of keys, the format "
                                "of RAYROUTE_API_KEYS_FILE). Takes precedence over `keys`.")
    secretKey: str = Field("api-keys.yaml", description="The Secret's key that holds the file.")
    keys: list[ApiKey] = Field(default_factory=list, description="Keys for a Secret the chart creates.")
    allowUnauthenticated: bool = Field(False, description="Serve without keys. Off: the chart refuses to render "
                                       "an endpoint anyone can call.")


class HuggingFace(Section):
    """``HF_TOKEN`` reaches the GPU worker pods only, where the engines download weights; never the pods that
    face clients (routers) or run Ray's control plane (head)."""

    existingSecret: str = Field("", description="A Secret holding a Hugging Face token, for gated models.")
    secretKey: str = Field("token")
    token: str = Field("", description="A token for a Secret the chart creates (prefer existingSecret).")


class RayAuth(Section):
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


class NetworkPolicies(Section):
    """Kubernetes NetworkPolicies around the release's pods (they need a CNI that enforces them). Ray's ports are
    open to the release's own pods only, plus KubeRay's operator and Prometheus on the ports they use; the API port
    on the pods that serve HTTP; GPU pods may send only to DNS, the release's pods and `engineEgress`. Each `*From`
    is a list of NetworkPolicy peers (`podSelector`, `namespaceSelector`, `ipBlock`)."""

    enabled: bool = True
    apiFrom: list[KubeObject] = Field(default_factory=list, description="Who may call the API (port 8000 of the "
                                   "router and GPU pods); empty: anyone, e.g. a LoadBalancer's clients.")
    operatorFrom: list[KubeObject] = Field(default_factory=lambda: [{
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}],
        description="KubeRay's operator, which deploys serveConfigV2 and reads status through the head's "
        "dashboard (8265) and may check Serve's proxy (8000); empty: nobody outside the release.")
    metricsFrom: list[KubeObject] = Field(default_factory=lambda: [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
        description="Prometheus, on Ray's metrics port (8080); empty: nobody outside the release.")
    engineEgress: list[KubeObject] = Field(
        default_factory=lambda: [copy.deepcopy(PUBLIC_HTTPS)],
        description="NetworkPolicy egress rules (`to`, `ports`) for where GPU pods fetch weights, adapters, pip "
        "packages and clients' media URLs, besides DNS and the release's pods. Default: HTTPS to public addresses "
        "only. Router pods get them too when a CPU model (which may run there) or `python.packages` is configured.")


class HAProxy(Section):
    """Serve's HTTP front on every pod. Its stats page (admin level) and metrics page listen on the pod's
    loopback only (the image patches Ray's template: router/haproxy.py)."""

    requestTimeoutSeconds: int = Field(10, ge=1, le=3600, description="HAProxy's `timeout http-request`: how "
                                       "long a client has to send a request's headers, so connections that "
                                       "trickle them cannot hold every connection slot.")
