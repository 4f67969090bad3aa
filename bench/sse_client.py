"""A streaming load generator, run as its own process so it does not share the gateway's loop.

    python bench/sse_client.py URL --concurrency 8 --streams 200 --tokens 256 [--rate 20] [--key K] [--duration S]

Prints one JSON line: streams done and failed, SSE events ("chunks"), elapsed, chunks/s, time to first chunk
(p50/p99, ms), and with --rate the number of chunks that came more than 50 ms later than the rate
allows (and the worst lateness).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import aiohttp


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rate", type=float, default=0.0, help="the backend's token rate, to judge lateness")
    parser.add_argument("--key", default="sk-bench")
    parser.add_argument(
        "--duration",
        type=float,
        default=0.0,
        help="start no new stream after this many seconds (0: no limit)",
    )
    args = parser.parse_args()
    body = {
        "model": "bench",
        "stream": True,
        "max_tokens": args.tokens,
        "messages": [{"role": "user", "content": "hi"}],
    }
    headers = {"authorization": f"Bearer {args.key}", "content-type": "application/json"}
    first_chunk: list[float] = []
    late = 0
    worst = 0.0
    chunks = failed = done = 0
    pending = args.streams
    began = time.perf_counter()

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal chunks, failed, late, worst, pending, done
        while pending > 0 and not (args.duration and time.perf_counter() - began > args.duration):
            pending -= 1
            done += 1
            started = time.perf_counter()
            previous = None
            try:
                async with session.post(args.url, json=body, headers=headers) as response:
                    if response.status != 200:
                        failed += 1
                        await response.read()
                        continue
                    async for data in response.content.iter_any():
                        # Count SSE events (a read may carry several, or part of one), not reads.
                        events = data.count(b"\n\n")
                        if not events:
                            continue
                        now = time.perf_counter()
                        if previous is None:
                            first_chunk.append(now - started)
                        elif args.rate:
                            lateness = (now - previous) - events / args.rate
                            worst = max(worst, lateness)
                            late += lateness > 0.05
                        previous = now
                        chunks += events
            except aiohttp.ClientError:
                failed += 1

    connector = aiohttp.TCPConnector(limit=args.concurrency + 10)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=600)
    ) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - started
    first_chunk.sort()
    result = {
        "streams": done - failed,
        "failed": failed,
        "chunks": chunks,
        "elapsed": round(elapsed, 3),
        "chunks_per_s": round(chunks / elapsed),
        "ttfc_p50_ms": round(first_chunk[len(first_chunk) // 2] * 1000, 2) if first_chunk else None,
        "ttfc_p99_ms": round(first_chunk[int(len(first_chunk) * 0.99)] * 1000, 2) if first_chunk else None,
        "late_chunks": late,
        "worst_lateness_ms": round(worst * 1000, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
