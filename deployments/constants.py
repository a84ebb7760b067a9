"""Rayroute's fixed policies, in one place: what Serve and the router do when replicas are slow, stuck or gone.

These are not per-model settings (those are in :mod:`deployments.model_config`, with their defaults): they are choices
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
# network, between the shards of one model. With pipeline stages it may span nodes, filling each before the next.
PLACEMENT_STRATEGY = "STRICT_PACK"
PIPELINE_PLACEMENT_STRATEGY = "PACK"

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

# --- per-key admission (router/limits.py, router/ingress.py) ------------------------------------------------------
# How long a router waits for the key-limits replica's answer before it applies `routers.key_limits_unavailable`.
# An answer is a few dictionary operations, under a millisecond plus a Ray call; two seconds is only ever a replica
# that is gone, restarting or wedged, and short enough that a client never notices it as a hang.
KEY_LIMITS_TIMEOUT_S = 2.0
# What a 503 for unreachable key limits tells clients to wait: Serve restarts the one key-limits replica in seconds.
KEY_LIMITS_RETRY_AFTER_S = 5.0
# While key limits stay unreachable, a router logs it once per this many seconds, not once per request.
KEY_LIMITS_WARN_EVERY_S = 60.0
# A reservation is dropped (its concurrency slot freed, its tokens kept as used) this long after its request's
# longest possible life (the model's and its fallbacks' `total_s`) if no router released it: the router that held it
# died. Long enough that a release still in flight from a live router always lands first.
RESERVATION_MARGIN_S = 60.0
# How often the key-limits replica looks for such expired reservations: a scan of the reservations in flight.
RESERVATION_SWEEP_S = 5.0
# What a refusal for too many concurrent requests tells clients to wait: a request's end frees the slot, and a
# chat request usually ends within seconds.
CONCURRENCY_RETRY_AFTER_S = 1.0
# A prompt's tokens are reserved before it is tokenized (that happens in the engine), as its UTF-8 bytes / this: the
# usual four characters of English per token, and bytes never fewer than characters. Text in other scripts takes
# more bytes per character and about as many per token, so the estimate stays near or above the truth; being cheap
# (no tokenizer in the router) matters more than being exact, because the actual count replaces it when the request
# ends.
PROMPT_BYTES_PER_TOKEN = 4
# An image, audio or video part's reserved prompt tokens: its base64 size says nothing of what the model makes of
# it, typically a few hundred to a couple of thousand tokens; the actual count replaces this at the end.
MEDIA_PART_TOKENS = 1024

# --- API keys (router/auth.py) ---------------------------------------------------------------------------------
# How often each router replica re-reads RAYROUTE_API_KEYS_FILE. Kubernetes takes up to about a minute to rewrite a
# mounted Secret after it changed; this adds little to that, for one small file read per router replica.
API_KEYS_RELOAD_S = 10.0
# The shortest key accepted (a shorter one is a config error at start or reload). 20 characters are 80 bits as hex
# (`openssl rand -hex 10`) and about 119 as base62: no guessing at any request rate finds one. It rules out the
# placeholders people type (`sk-1234`, `changeme`, `test-key`), which no throttle makes safe; OpenAI's own keys
# are over 50 characters, so no real key is refused.
MIN_API_KEY_LENGTH = 20
# Failed keys (401s) are throttled per client address as a token bucket (router/auth_throttle.py): this many
# failures at once, then one more every AUTH_FAILURE_REFILL_S; beyond that a wrong key gets 429 with Retry-After.
# A client with a mistyped or revoked key makes a few tries and a retry or two per try (the OpenAI SDK retries
# twice), well within 10; a steady 10 a minute is far above any honest client's and far below a guesser's.
AUTH_FAILURE_BURST = 10
AUTH_FAILURE_REFILL_S = 6.0
# Addresses the throttle remembers, least recently failed dropped first: about 250 bytes each, so 2.5 MB per router
# replica at most, whatever clients send; one that fails from more addresses than this gets a fresh burst per
# address anyway.
AUTH_FAILURE_MAX_ADDRESSES = 10_000
# IPv6 clients are throttled per /64: a host is routinely given a whole /64 and can pick any address in it, so a
# bucket per address would be one per request for a client that wants it.
AUTH_FAILURE_IPV6_PREFIX = 64
# The client's address behind HAProxy: HAProxy appends the address it accepted the connection from to
# X-Forwarded-For (router/haproxy.py), and a router replica trusts that header only from a peer in these networks
# (HAProxy reaches a router over the loopback, or over the cluster's private network from another node or pod;
# clients reach only HAProxy). From any other peer the peer itself is the client, whatever the header says.
TRUSTED_PROXY_NETWORKS = ("127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")

# --- stream channels (deployments/stream_channel.py, router/channel_client.py) -------------------------------
# How long an offered stream waits for its router to connect; a router that does not come within this has gone.
CHANNEL_OFFER_TIMEOUT_S = 30.0
# Opening a channel is one request to a replica that is waiting for it; a replica that does not answer is gone.
CHANNEL_CONNECT_TIMEOUT_S = 10.0

# --- prefix-cache replica choice (deployments/prefix_routing.py) ---------------------------------------------------
# Ray Serve LLM's prefix-affinity router sends each prompt's text to one prefix-tree actor per model twice (a match,
# then an insert); the actor does both in Python at about 40 ns a character (measured: 0.7 ms each at 16 KiB) while
# every router replica waits on it. Only this many characters from the prompt's start are matched and inserted:
# affinity needs the start only (a system prompt and a conversation's first turn, about 4,000 tokens of English,
# tell conversations apart; a conversation that grew past it matches all of it on the replica that holds it), and a
# 4 MiB prompt would otherwise cost the actor about 0.15 s a call and the tree 4 MB.
PREFIX_MATCH_CHARS = 16_384
# Ray keeps every inserted prompt unless eviction is on. Per replica: once the tree holds more characters than the
# threshold for it, the least recently used are dropped down to the target (a gap, so eviction does not run on every
# check). A million characters are about 60 distinct 16 KiB starts, and many more conversations where a system
# prompt is shared (it is stored once): as much as a large GPU's prefix cache holds, at about a byte a character
# (measured; prompts built to split the tree at every character cost up to ~800 bytes a character).
PREFIX_TREE_EVICTION_THRESHOLD_CHARS = 1_000_000
PREFIX_TREE_EVICTION_TARGET_CHARS = 800_000
# How often the tree's actor checks; between checks the tree grows by at most one PREFIX_MATCH_CHARS per request.
# A check is a look at each replica's count, so a second costs nothing (Ray's default is 10 s).
PREFIX_TREE_EVICTION_INTERVAL_S = 1

# --- KV-cache replica choice (deployments/kv_routing.py, deployments/kv_events.py) ---------------------------------
# How often Serve's controller asks each replica for the blocks its cache holds (its routing stats) and sends them to
# every router. A second: a tenant's next request usually comes later than that, and the ask is a set of integers
# (up to the engine's block count; a few hundred on the CPU, tens of thousands on a large GPU). Serve's default is 10 s.
KV_STATS_PERIOD_S = 1.0
KV_STATS_TIMEOUT_S = 10.0
# Replicas whose load (requests running and queued) is within this many requests of the least loaded one compete on
# cached blocks; busier ones come after them, by load. Large enough that a tenant's requests stay together under a
# steady load, small enough that a replica holding a popular prefix is not given a queue the others lack.
KV_CACHE_LOAD_SLACK = 4
# What a replica's free cache room weighs against the share of a prompt it holds: a prompt moves from a full cache to
# one half empty only when that cache holds less than a third of it. So a tenant placed where its blocks are evicted
# by others' (three tenants on a cache with room for two) moves to the cache with room and stays there, while one
# that mostly hits stays where it hits.
KV_CACHE_FREE_WEIGHT = 2 / 3
# Only a prompt's first characters are tokenized to be matched: about 16,000 tokens of English (128 blocks of the CPU
# build's 128 tokens, 1,000 of a GPU's 16), more than any system prompt, at about 1.5 ms of router CPU per 1,000
# tokens (measured, SmolLM2's tokenizer); a 4 MiB prompt whole would cost the router seconds.
KV_MATCH_CHARS = 65_536
# Where a router sent a prompt's blocks counts as held there for this long: until the replica's own report (within
# KV_STATS_PERIOD_S, and Serve's broadcast) says what it did with them.
RECENT_ROUTES_TTL_S = 5.0
# Bounds of a router's memory of its recent routes (blocks per replica) and of prompts being ranked (requests).
RECENT_ROUTES_MAX_BLOCKS = 65_536
ROUTED_REQUESTS_KEPT = 4_096
# How long a request may wait for its model's tokenizer, which a router loads once the model has two replicas: past
# it, the request is placed by load. Loading takes under a second on an idle machine, several on a busy one.
KV_TOKENIZER_WAIT_S = 10.0
# Choice and tokenization times a router keeps, for the benchmark's report.
KV_CHOICE_TIMES_KEPT = 10_000
# Ray Serve's consistent-hash session router (replica_choice: session): replicas tried after a session's own one
# when it is full (max_ongoing_requests), before the request waits.
SESSION_FALLBACK_REPLICAS = 2
# A session id past this many characters is cut: it is only hashed, but it travels with the request to Serve.
MAX_SESSION_CHARS = 256

# --- media URLs (router/media.py) -------------------------------------------------------------------------------
# How long the router waits for DNS to resolve a media URL's host (all of a request's hosts at once) before it
# refuses the request: a cluster resolver answers in milliseconds, cached names at once; longer is a resolver or a
# name that is failing, and an engine would wait on the same name for its fetch.
MEDIA_RESOLVE_TIMEOUT_S = 2.0
# Media URLs one request may name (data: URLs are not counted: nothing is fetched for them). Each is a download the
# engine makes before its prefill; 256 is more images or clips than any real prompt sends by URL, and bounds the
# router's checking (a URL parse each, ~10 µs) whatever the request holds.
MAX_MEDIA_URLS = 256
