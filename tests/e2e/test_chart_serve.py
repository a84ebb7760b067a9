"""The chart's rendered Serve config, served: what KubeRay would deploy, through the launcher ``make serve`` uses
(the chart's rendering itself is checked offline in ``tests/unit/test_chart.py``, whose helpers this reuses)."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
import yaml

from router.auth import API_KEYS_FILE_ENV
from tests.unit.test_chart import CHART, ROOT, ROUTER_GROUP, of_kind, only, pod_templates, template


@pytest.mark.e2e
def test_rendered_serve_config_serves_on_a_local_ray_cluster(tmp_path: Path) -> None:
    """What KubeRay would deploy, deployed: the chart's serveConfigV2 (CPU model, chart-made keys Secret) through
    the launcher `make serve` uses, with the keys file mounted as the router pods' env var says. Only Kubernetes
    itself is missing: the routers' pin to the router pods' Ray resource, the proxy and the keys all run for
    real."""
    import httpx

    from tests.e2e.harness import QUICK_STOP_ENV, launched

    local = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())["applications"][0]["args"]["models"][0]
    model = {**local, "engine_args": {**local["engine_args"], "kv_cache_memory_bytes": 256 * 1024 * 1024}}
    key = "sk-chart-" + "0123456789abcdef"
    override = {"serve": {"models": [model], "routers": {"replicas": 1}}, "workerGroups": [],
                "apiKeys": {"keys": [{"name": "chart-test", "key": key}]}}
    result = template(CHART / "ci" / "open-endpoint-values.yaml", extra=override, tmp=tmp_path)
    assert result.returncode == 0, result.stderr
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    config = tmp_path / "serveConfigV2.yaml"
    config.write_text(only(docs, "RayService")["spec"]["serveConfigV2"])

    # A router pod: the Secret's file where the volume puts it, the env var naming it.
    routers = pod_templates(docs)[ROUTER_GROUP]["spec"]
    volume = next(v for v in routers["volumes"] if v["name"] == "api-keys")["secret"]
    (item,) = volume["items"]
    secret = next(d for d in of_kind(docs, "Secret") if d["metadata"]["name"] == volume["secretName"])
    keys_file = tmp_path / item["path"]
    keys_file.write_bytes(base64.b64decode(secret["data"][item["key"]]))
    env = {**os.environ, API_KEYS_FILE_ENV: str(keys_file), "RAY_DEDUP_LOGS": "0", **QUICK_STOP_ENV}
    env.pop("RAYROUTE_API_KEYS", None)

    with launched(config, tmp_path / "serve.log", env) as cluster:
        body = {"model": model["id"], "max_tokens": 8,
                "messages": [{"role": "user", "content": "What is the capital of France?"}]}
        url = cluster.base_url + "/v1/chat/completions"
        assert httpx.post(url, json=body, timeout=120).status_code == 401
        reply = httpx.post(url, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"]
