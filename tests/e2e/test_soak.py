"""Two minutes of ``make soak``'s traffic on the shared cluster (tests/scenarios/soak.py, in its own process): every
request answered, bad ones with a 4xx in OpenAI's envelope, every stream ended once, nothing hung, and no metric
series for the model names clients made up.

Memory is printed, never asserted: two minutes show a cluster settling, not a trend; ``make soak`` runs the half
hour whose verdict says whether it stays flat.
"""

from __future__ import annotations

import pytest

from tests.e2e.harness import API_KEY, Cluster, run_scenario
from tests.scenarios import soak

pytestmark = pytest.mark.e2e
MINUTES = 1.5
SAMPLE_S = 15
# What may appear after warm-up without a leak: a status or a router replica counted for the first time, one line
# each. A series per unknown model name would add at least one per name, and dozens are sent.
RAYROUTE_SERIES_GROWTH_MAX = 20


def test_a_short_soak_answers_everything_and_adds_no_series_per_name(cluster: Cluster) -> None:
    report = run_scenario("tests.scenarios.soak", ["--url", cluster.base_url, "--metrics-port",
                                                   str(cluster.metrics_port), "--api-key", API_KEY,
                                                   "--minutes", str(MINUTES), "--sample-s", str(SAMPLE_S)])
    assert "error" not in report, f"{report['error']}\n{report['output']}"
    print(soak.table(report))
    requests = report["requests"]
    for kind, seen in requests.items():
        assert seen["count"] > 0, f"no {kind} request was sent"
        assert not [status for status in seen["statuses"] if status.startswith("5")], (kind, seen)
        assert seen["client_errors"] == 0 and seen["hung"] == 0, (kind, seen, report["examples"])
        assert seen["streams_not_one_done"] == 0 and seen["error_events"] == 0, (kind, seen, report["examples"])
    for kind in soak.BAD:
        statuses = requests[kind]["statuses"]
        assert all(status.startswith("4") for status in statuses), (kind, statuses)
        assert requests[kind]["without_envelope"] == 0, (kind, report["examples"])
    for kind in soak.GOOD:
        assert set(requests[kind]["statuses"]) == {"200"}, (kind, requests[kind], report["examples"])
    assert report["hung"] == 0, report["examples"]

    verdict = report["verdict"]
    assert report["unknown_models_sent"] > 0
    assert verdict["unknown_model_series"] == 0, "a metric series names a model a client made up"
    growth = verdict["rayroute_series"]["growth"]
    assert growth is not None, [sample["rayroute_series"] for sample in report["samples"]]
    assert growth <= RAYROUTE_SERIES_GROWTH_MAX, (verdict["rayroute_series"], report["unknown_models_sent"])
