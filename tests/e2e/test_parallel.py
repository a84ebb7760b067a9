"""Replicas of several workers: tensor parallel 2 on one node, pipeline parallel 2 across two, each a placement group
with vLLM's Ray executor in it, answering as one worker does; scaled by whole groups; a lost worker's replica
replaced while requests are answered. The phases of ``tests/scenarios/parallel.py``, run once on one cluster in its
own process, one test per phase on that run's report."""

from __future__ import annotations

import math

import pytest

from tests.e2e.harness import run_scenario, scenario_phase

pytestmark = pytest.mark.e2e
# Log-probs of the same greedy step computed by one worker and by two: the split changes only the order of float32
# additions.
LOGPROB_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def report() -> dict:
    return run_scenario("tests.scenarios.parallel")


def same_answer(one: dict, other: dict) -> None:
    assert one["status"] == other["status"] == 200, (one, other)
    assert other["text"] == one["text"]
    assert [p["token"] for p in other["logprobs"]] == [p["token"] for p in one["logprobs"]]
    for mine, theirs in zip(one["logprobs"], other["logprobs"], strict=True):
        assert math.isclose(mine["logprob"], theirs["logprob"], abs_tol=LOGPROB_TOLERANCE), (mine, theirs)
        assert [t for t, _ in theirs["top"]] == [t for t, _ in mine["top"]]
        for (_, a), (_, b) in zip(mine["top"], theirs["top"], strict=True):
            assert math.isclose(a, b, abs_tol=LOGPROB_TOLERANCE), (mine, theirs)


@pytest.mark.parametrize("model", ["tiny-tp2", "tiny-pp2"])
def test_a_group_answers_as_one_worker_does(report: dict, model: str) -> None:
    """Greedy answers, streamed and not, with their top-5 log-probs at every step: the same as the one-worker
    replica's (text and tokens exactly; log-probs within float32 rounding)."""
    answers = scenario_phase(report, "answers")
    for reference, answer in zip(answers["tiny-one"], answers[model], strict=True):
        assert len(reference["logprobs"]) > 0
        same_answer(reference, answer)
        assert answer.get("done", True)


def test_engine_info_reports_the_workers_and_where_they_run(report: dict) -> None:
    placement = scenario_phase(report, "placement")
    kinds = placement["node_kinds"]
    assert placement["tiny-one"]["workers"] == []  # one worker runs in the engine core
    tp2, pp2 = placement["tiny-tp2"], placement["tiny-pp2"]
    assert [w["name"][-3:] for w in tp2["workers"]] == ["TP0", "TP1"]
    assert {w["node_id"] for w in tp2["workers"]} == {tp2["node_id"]}  # packed on the replica's node
    assert [w["name"][-3:] for w in pp2["workers"]] == ["PP0", "PP1"]
    stage_nodes = {w["node_id"] for w in pp2["workers"]}
    assert len(stage_nodes) == 2 and {kinds[n] for n in stage_nodes} == {"stage"}  # one stage on each stage node
    assert len({w["pid"] for w in tp2["workers"] + pp2["workers"]}) == 4


def test_scaling_reserves_a_whole_group_per_replica(report: dict) -> None:
    scale = scenario_phase(report, "scale")
    tp2_shape = [{"CPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}]
    groups = [g for g in scale["groups"] if g["bundles"] == tp2_shape]
    assert len(groups) == 2, scale["groups"]
    for group in groups:
        assert group["strategy"] == "STRICT_PACK" and len(set(group["nodes"])) == 1, group
    replicas = scale["replicas"]
    assert len(replicas) == 2 and all(len(info["workers"]) == 2 for info in replicas.values()), replicas
    workers = [w["pid"] for info in replicas.values() for w in info["workers"]]
    assert len(set(workers)) == 4


def test_losing_one_worker_replaces_its_replica_and_no_request_fails(report: dict) -> None:
    loss = scenario_phase(report, "worker_loss")
    print({k: v for k, v in loss.items() if k not in ("results", "replicas_after", "groups_after")})
    for result in loss["results"]:  # sent right after the kill, before any first token
        assert result["status"] == 200 and "error_event" not in result, result
        assert result.get("done", True) and result["logprobs"], result
    after = loss["replicas_after"]
    assert str(loss["victim_replica"]) not in after and len(after) == 2
    assert all(len(info["workers"]) == 2 for info in after.values())
    assert loss["victim"]["pid"] not in {w["pid"] for info in after.values() for w in info["workers"]}
    tp2_groups = [g for g in loss["groups_after"] if len(g["bundles"]) == 3 and g["strategy"] == "STRICT_PACK"]
    assert len(tp2_groups) == 2, loss["groups_after"]  # the lost replica's group was given back
