"""Rayroute's fixed policies, in one place: what Serve and the router do when replicas are slow, stuck or gone.

These are not per-model settings (those are in :mod:`deployments.config`, with their defaults): they are choices
that hold for every model, each with the reason for its value. ``router/`` reads them from here too.
"""

from __future__ import annotations

# --- engine replicas (deployments/engine.py, router/app.py) ---------------------------------------------------
# Serve pings each engine replica this often (an engine ping plus the stall check below) and replaces one that
# fails three times in a row or takes longer than the timeout: a busy CPU engine can take seconds to answer.
HEALTH_CHECK_PERIOD_S = 5.0
HEALTH_CHECK_TIMEOUT_S = 30.0
# An engine that holds requests but has made no token for this long is stuck; its replica reports unhealthy.
# Generous, because one prefill of a long prompt on a big model is one long step.
STALL_TIMEOUT_S = 120.0
# A replica's placement group (the replica and its tensor-parallel workers) is all on one node: NVLink, not the
# network, between the shards of one model.
PLACEMENT_STRATEGY = "STRICT_PACK"

# --- metrics (router/telemetry.py, deployments/engine.py) --------------------------------------------------------
# How often gauges are published when nothing else sets them: Ray drops a gauge not set for two export intervals,
# and a dropped series is "No data" on a dashboard, not 0. Well within any scrape interval, a few calls a second.
GAUGE_PUBLISH_S = 1.0

# --- the router's calls (router/dispatch.py) -----------------------------------------------------------------
# Between attempts at a request whose replica failed: long enough for Serve to notice, short next to a timeout;
# doubled after each failure, up to the maximum.
RETRY_PAUSE_S, RETRY_PAUSE_MAX_S = 0.25, 2.0
# What a 503 (no replica within the queue timeout) tells clients to wait: about the time a replica takes to start.
UNAVAILABLE_RETRY_AFTER_S = 10.0
# Calls the one key-limits replica takes at once: each is a few dictionary operations, so this only bounds a flood.
KEY_LIMITS_MAX_ONGOING = 4096

# --- API keys (router/auth.py) ---------------------------------------------------------------------------------
# How often each router replica re-reads RAYROUTE_API_KEYS_FILE. Kubernetes takes up to about a minute to rewrite a
# mounted Secret after it changed; this adds little to that, for one small file read per router replica.
API_KEYS_RELOAD_S = 10.0

# --- stream channels (deployments/stream_channel.py, router/channel_client.py) -------------------------------
# How long an offered stream waits for its router to connect; a router that does not come within this has gone.
CHANNEL_OFFER_TIMEOUT_S = 30.0
# Opening a channel is one request to a replica that is waiting for it; a replica that does not answer is gone.
CHANNEL_CONNECT_TIMEOUT_S = 10.0
