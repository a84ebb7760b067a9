"""Scenario: bodies of 500,000 messages (16 MiB) sent at a router while it streams to another client.

Why: the router parses bodies on the loop that relays streams, so a body that is expensive to refuse would show as a
gap in every stream the router serves. The body-size limit must refuse it before any parse, and the stream beside it
must keep flowing; this prints the stream's worst token gap with and without the bodies (A B B A), a figure to read,
not a timed test (``tests/test_security.py`` runs it small and checks only the answers).

    python -m tests.scenarios.big_body --base-url http://127.0.0.1:8000 --key "$RAYROUTE_API_KEY" [--bodies 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx

MESSAGES = 500_000


def big_body(model: str, messages: int = MESSAGES) -> bytes:
    """A chat request of ``messages`` tiny messages: about 16 MiB of JSON."""
    message = {"role": "user", "content": "x" * 6}
    return json.dumps({"model": model, "messages": [message] * messages}).encode()


@dataclass
class Report:
    refusals: list[int] = field(default_factory=list)  # the status of each big body
    refusal_ms: list[float] = field(default_factory=list)
    stream_completed: bool = False
    stream_chunks: int = 0
    worst_gap_ms: float = 0.0


async def _stream(client: httpx.AsyncClient, key: str, model: str, report: Report) -> None:
    body = {"model": model, "stream": True, "max_tokens": 48, "temperature": 0,
            "messages": [{"role": "user", "content": "Count from one to fifty in words."}]}
    last = None
    async with client.stream("POST", "/v1/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {key}"}) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            now = time.perf_counter()
            if last is not None:
                report.worst_gap_ms = max(report.worst_gap_ms, (now - last) * 1000)
            last = now
            report.stream_chunks += 1
            if line == "data: [DONE]":
                report.stream_completed = response.status_code == 200


async def _bodies(client: httpx.AsyncClient, key: str, payload: bytes, count: int, report: Report) -> None:
    for _ in range(count):
        started = time.perf_counter()
        with_headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        try:
            response = await client.post("/v1/chat/completions", content=payload, headers=with_headers)
            report.refusals.append(response.status_code)
        except httpx.HTTPError:
            # The front may close the connection once it answered 413 without reading the rest of the body.
            report.refusals.append(-1)
        report.refusal_ms.append((time.perf_counter() - started) * 1000)


async def _run(base_url: str, key: str, model: str, bodies: int) -> Report:
    report = Report()
    payload = big_body(model) if bodies else b""
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
        stream = asyncio.create_task(_stream(client, key, model, report))
        await asyncio.sleep(0.5)  # the stream is under way before the first body arrives
        async with httpx.AsyncClient(base_url=base_url, timeout=300) as other:
            await _bodies(other, key, payload, bodies, report)
        await stream
    return report


def refuse_big_bodies_during_a_stream(base_url: str, key: str, model: str, bodies: int) -> Report:
    """One stream, and meanwhile ``bodies`` big bodies one after another, on their own connection."""
    return asyncio.run(_run(base_url, key, model, bodies))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--key", default="none")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--bodies", type=int, default=20)
    opts = parser.parse_args()
    rows = []
    for label in ("A: stream alone", "B: with big bodies", "B: with big bodies", "A: stream alone"):
        bodies = opts.bodies if label.startswith("B") else 0
        rows.append((label, refuse_big_bodies_during_a_stream(opts.base_url, opts.key, opts.model, bodies)))
    print(f"{'run':<22} {'completed':>9} {'chunks':>6} {'worst gap ms':>12} {'refusals':>10} "
          f"{'refusal ms p50/max':>20}")
    for label, report in rows:
        times = sorted(report.refusal_ms)
        refusal = f"{times[len(times) // 2]:.0f} / {times[-1]:.0f}" if times else "-"
        statuses = ",".join(sorted({str(s) for s in report.refusals})) or "-"
        print(f"{label:<22} {report.stream_completed!s:>9} {report.stream_chunks:>6} {report.worst_gap_ms:>12.1f} "
              f"{statuses:>10} {refusal:>20}")


if __name__ == "__main__":
    main()
