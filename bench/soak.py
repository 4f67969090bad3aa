"""Soak: 100,000 acquire/release cycles through one pool with ``queue_timeout`` set and a model whose
queue never empties; the process's RSS at 10 points, and the largest each scheduler index was in
the tenth of the run before each (read every 100 cycles; a heap keeps up to 32 withdrawn entries
before it compacts, so a flat index moves between its live size and that).

Flat is the goal: a long-running gateway must not grow per request. Run it against another tree
(``PYTHONPATH=/path/to/old/src python bench/soak.py``) to compare; before the indexes were cleaned
when their tickets ended, the deadline heap kept one entry per request and the arrival order one
per grant while the queue never emptied.

    .venv/bin/python bench/soak.py [--cycles 100000] [--slots 2] [--waiters 2]
"""

from __future__ import annotations

import argparse
import gc
import os
from typing import Any

import anyio

from local_inference_pool import BackendConfig, Pool, PoolConfig


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def index_sizes(pool: Pool) -> dict[str, int]:
    scheduler: Any = pool.scheduler
    if hasattr(scheduler, "index_sizes"):
        return dict(scheduler.index_sizes())
    # The scheduler before the split (one class, lazily cleaned heaps): its private indexes.
    return {
        "queues": sum(len(q) for q in scheduler._queues.values()),
        "arrivals": sum(len(a) for a in scheduler._arrivals.values()),
        "deadlines": len(scheduler._deadlines),
        "hold_ends": len(scheduler._holds),
        "tenants": len(scheduler.tenants),
        "grants": len(scheduler.grants),
        "sessions": len(scheduler._affinity),
    }


async def soak(cycles: int, slots: int, waiters: int) -> list[tuple[int, float, dict[str, int]]]:
    backend = BackendConfig(url="http://a:8080", name="a", slots=slots, models=("m",))
    pool = Pool(PoolConfig(backends=(backend,), queue_timeout=600))
    done = 0
    points: list[tuple[int, float, dict[str, int]]] = []
    step = cycles // 10
    largest: dict[str, int] = {}  # the largest each index was since the last point, read every 100

    async def worker() -> None:
        nonlocal done
        while done < cycles:
            lease = await pool.acquire("m", session=f"s{done % 100}")
            await anyio.lowlevel.checkpoint()  # hold it across a turn of the loop: others queue
            lease.release()
            done += 1
            if done % 100 == 0:
                for name, size in index_sizes(pool).items():
                    largest[name] = max(size, largest.get(name, 0))
            if done % step == 0:
                gc.collect()
                points.append((done, rss_mb(), dict(largest)))
                largest.clear()

    async with anyio.create_task_group() as group:
        for _ in range(slots + waiters):  # ``waiters`` more than slots: the queue never empties
            group.start_soon(worker)
    return points


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cycles", type=int, default=100_000)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--waiters", type=int, default=2)
    args = parser.parse_args()
    points = anyio.run(soak, args.cycles, args.slots, args.waiters)
    names = sorted({name for _, _, sizes in points for name in sizes})
    print(f"{args.cycles} cycles, {args.slots} slots, {args.waiters} always waiting, queue_timeout 600")
    print(f"{'cycles':>8} {'RSS MB':>8} " + " ".join(f"{name:>10}" for name in names))
    for count, rss, sizes in points:
        print(f"{count:>8} {rss:>8.1f} " + " ".join(f"{sizes.get(name, 0):>10}" for name in names))


if __name__ == "__main__":
    main()
