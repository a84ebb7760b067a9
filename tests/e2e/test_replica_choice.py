"""Replica choice by KV-cache contents on the shared cluster: ``smollm2-pair``'s two replicas (``replica_choice:
kv_cache``) report the blocks their vLLM engines hold, from vLLM's own KV-cache events, and the routers send each
request where its prompt's start is cached, unless that replica is much busier; when the events say the blocks are
gone, or the replica is, the request goes elsewhere. Which replica took a request is read from each replica's count
of requests it took (``engine_info``)."""

from __future__ import annotations

import threading
import time

import httpx
import psutil
import pytest

from deployments.constants import KV_CACHE_LOAD_SLACK, KV_STATS_PERIOD_S, RECENT_ROUTES_TTL_S
from tests.e2e.harness import API_KEY, PAIR_MODEL, Cluster

pytestmark = pytest.mark.e2e

# About 900 tokens of SmolLM2's tokenizer with the chat template: 7 full blocks of the CPU build's 128 tokens.
TENANT_PROMPT = "You keep the archive of the Verne society, tenant {tenant}. " + " ".join(
    f"Rule {i}: record {i} stays in drawer {i % 7}, and only its curator may lend it." for i in range(60))
TENANT_BLOCKS = 7
AUTH = {"Authorization": f"Bearer {API_KEY}"}
# How long after a replica's report every router has it: Serve's controller polls each replica every
# KV_STATS_PERIOD_S and broadcasts the answers; on two busy cores with nine engines a round can take several periods.
ROUTERS_HEAR_S = 6 * KV_STATS_PERIOD_S + 1


def ask(cluster: Cluster, tenant: str, question: str, max_tokens: int = 4) -> int:
    body = {"model": PAIR_MODEL, "max_tokens": max_tokens, "min_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "system", "content": TENANT_PROMPT.format(tenant=tenant)},
                         {"role": "user", "content": question}]}
    return httpx.post(cluster.base_url + "/v1/chat/completions", json=body, headers=AUTH, timeout=300).status_code


def replicas(cluster: Cluster) -> dict[int, dict]:
    """Each replica's (requests taken, blocks held), by process id."""
    return {pid: (info["admitted_requests"], info["kv_blocks"])
            for pid, info in cluster.replica_infos(PAIR_MODEL, 2).items()}


def taken_since(cluster: Cluster, before: dict[int, tuple]) -> dict[int, int]:
    return {pid: taken - before[pid][0] for pid, (taken, _) in replicas(cluster).items()}


def holder_of_new_blocks(cluster: Cluster, before: dict[int, tuple]) -> int:
    """The replica whose engine reported the tenant's blocks (its events reached its replica), once every router
    has heard of them: Serve's controller asks each replica every KV_STATS_PERIOD_S and passes the answers on. Two
    router replicas, each with its own memory of where it sent what: one that has not heard would place the
    tenant by load."""
    deadline = time.monotonic() + 30
    while True:
        grown = [pid for pid, (_, blocks) in replicas(cluster).items() if blocks >= before[pid][1] + TENANT_BLOCKS]
        if len(grown) == 1:
            time.sleep(ROUTERS_HEAR_S)
            return grown[0]
        assert time.monotonic() < deadline, f"no replica reported the tenant's blocks: {replicas(cluster)}"
        time.sleep(0.5)


def test_a_tenants_requests_go_to_the_replica_whose_cache_holds_its_prefix(cluster: Cluster) -> None:
    before = replicas(cluster)
    assert ask(cluster, "first", "Where is record 3?") == 200
    holder = holder_of_new_blocks(cluster, before)
    for question in range(6):
        assert ask(cluster, "first", f"Who may lend record {question}?") == 200
    assert taken_since(cluster, before) == {pid: 7 if pid == holder else 0 for pid in before}


def test_a_busy_holder_shares_its_tenant_and_an_evicted_one_loses_it(cluster: Cluster) -> None:
    before = replicas(cluster)
    assert ask(cluster, "second", "Where is record 5?") == 200
    holder = holder_of_new_blocks(cluster, before)
    other = next(pid for pid in before if pid != holder)

    # Long answers, one after another: the holder takes them until it is KV_CACHE_LOAD_SLACK requests busier than
    # the other. Spaced so that the replicas' reports (every KV_STATS_PERIOD_S) count the earlier ones: the two
    # router replicas each know only their own sends.
    streams = [threading.Thread(target=ask, args=(cluster, "second", f"List drawer {i}.", 400))
               for i in range(KV_CACHE_LOAD_SLACK + 3)]
    for stream in streams:
        stream.start()
        time.sleep(KV_STATS_PERIOD_S + 0.5)
    for stream in streams:
        stream.join()
    taken = taken_since(cluster, before)
    assert taken[holder] >= KV_CACHE_LOAD_SLACK + 1 and taken[other] >= 1, taken

    # Both now hold the tenant's prefix. Evicted from the first holder (it reports its cache empty), it goes to
    # the other.
    cluster.reset_prefix_cache(PAIR_MODEL, holder)
    # The routers hear of it, and their memory of where they sent the tenant runs out.
    time.sleep(max(RECENT_ROUTES_TTL_S, ROUTERS_HEAR_S))
    before = replicas(cluster)
    for question in range(4):
        assert ask(cluster, "second", f"Which drawer holds record {question}?") == 200
    assert taken_since(cluster, before) == {holder: 0, other: 4}


@pytest.mark.disruptive
def test_a_holder_that_dies_leaves_the_index_and_gets_nothing(cluster: Cluster) -> None:
    before = replicas(cluster)
    assert ask(cluster, "third", "Where is record 8?") == 200
    holder = holder_of_new_blocks(cluster, before)
    psutil.Process(holder).kill()
    statuses = [ask(cluster, "third", f"Who may lend record {question}?") for question in range(4)]
    assert statuses == [200] * 4  # the routers left the dead replica (Serve retries one sent as it died)
    deadline = time.monotonic() + 240
    while cluster.replicas(PAIR_MODEL).get("RUNNING") != 2:  # the replacement, with an empty cache
        assert time.monotonic() < deadline, cluster.replicas(PAIR_MODEL)
        time.sleep(2)
    after = replicas(cluster)
    assert holder not in after
