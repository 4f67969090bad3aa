"""The fleet's runtime changes under random interleavings: backends added, removed, drained and
undrained, slots changed and the file reloaded, through any process, while leases are acquired,
released and given up, in one process and in three pools on one real Redis.

After every step: no backend holds more leases than its slots allowed since its oldest live lease
was granted, no lease is granted on a backend that every process knows is draining or gone, and
at the end every lease was released exactly once (each pool and the store count none) and every
request that waited was answered (granted, or failed with a clear error), none lost.

The three pools run in one event loop (three handles on the store, as three processes are to it),
so that a step can wait until every one of them applied a change; ``test_living_fleet`` runs real
processes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import TaskGroup
from asgi_lifespan import LifespanManager
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette

from local_inference_pool.config import ConfigSource
from local_inference_pool.errors import PoolError
from local_inference_pool.gateway.app import create_pool_app
from local_inference_pool.gateway.changes import ChangeRefused, FleetChanges
from local_inference_pool.pool.leases import Lease
from local_inference_pool.pool.pool import Pool

from ..fakes import FakeBackend, Fleet
from ..redis_store import Store

pytestmark = pytest.mark.anyio

CONFIGURED = {"a:8080": 2, "b:8080": 1}
ADDABLE = ("c:8080", "d:8080")
NAMES = (*CONFIGURED, *ADDABLE)


def config_text(slots: dict[str, int], state: str | None) -> str:
    pool = (
        "[pool]\nhealth_interval = 60\ndrain_timeout = 0.2\nqueue_timeout = 60\nshutdown_grace = 0.2\n"
        'admin_keys = ["admin"]\n'
    )
    if state is not None:
        pool += f'state = "{state}"\nlease_ttl = 5\n'
    return pool + "".join(
        f'[[backends]]\nurl = "http://{name}"\nslots = {n}\nmodels = ["m"]\n' for name, n in slots.items()
    )


@dataclass
class Member:
    """One process of the fleet: its pool and its changes."""

    app: Starlette

    @property
    def pool(self) -> Pool:
        pool: Pool = self.app.state.runtime.pool
        return pool

    @property
    def changes(self) -> FleetChanges:
        changes: FleetChanges = self.app.state.changes
        return changes


@dataclass
class Intent:
    """What the changes asked for, as an operator reads them: the file, and the overlays on it."""

    file: dict[str, int] = field(default_factory=lambda: dict(CONFIGURED))
    patched: dict[str, int] = field(default_factory=dict)  # configured backend -> slots
    added: dict[str, int] = field(default_factory=dict)
    removed: set[str] = field(default_factory=set)
    drained: set[str] = field(default_factory=set)

    def slots(self) -> dict[str, int]:
        """Each backend wanted now and its slots."""
        wanted = {n: self.patched.get(n, k) for n, k in self.file.items() if n not in self.removed}
        return {**wanted, **self.added}

    def reset(self) -> None:
        self.patched, self.added, self.removed, self.drained = {}, {}, set(), set()


@dataclass
class Model:
    """What the test knows: the leases it holds, and what each backend's slots were, step by step."""

    step: int = 0
    intent: Intent = field(default_factory=Intent)
    held: list[tuple[Lease, int]] = field(default_factory=list)  # the lease and the step of its grant
    released: set[int] = field(default_factory=set)  # ids of leases released
    waiting: list[anyio.CancelScope] = field(default_factory=list)
    outcomes: list[str] = field(default_factory=list)
    started: int = 0
    slots: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # name -> (step, slots)
    gone_since: dict[str, int] = field(default_factory=dict)  # drained or removed everywhere, since

    def slots_now(self, name: str, slots: int) -> None:
        history = self.slots.setdefault(name, [])
        if not history or history[-1][1] != slots:
            history.append((self.step, slots))

    def allowed(self, name: str, since: int) -> int:
        """The most slots the backend had at any step from ``since`` on."""
        history = self.slots.get(name, [])
        in_effect = [n for step, n in history if step >= since]
        before = [n for step, n in history if step < since]
        return max([*in_effect, *before[-1:]], default=0)


@asynccontextmanager
async def fleet_of(tmp: Path, members: int, state: str | None) -> AsyncIterator[tuple[list[Member], Path]]:
    fakes = Fleet(**{name.split(":")[0]: FakeBackend(slots=4) for name in NAMES})
    path = tmp / "pool.toml"
    path.write_text(config_text(CONFIGURED, state))
    source = ConfigSource.at(path)
    async with AsyncExitStack() as stack:
        fleet = []
        for _ in range(members):
            app = create_pool_app(source.load(), transport=fakes.transport, source=source)
            await stack.enter_async_context(LifespanManager(app))
            fleet.append(Member(app))
        yield fleet, path


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("acquire"), st.integers(0, 2)),
        st.tuples(st.just("acquire"), st.integers(0, 2)),
        st.tuples(st.just("release"), st.integers(0, 63)),
        st.tuples(st.just("release"), st.integers(0, 63)),
        st.tuples(st.just("cancel"), st.integers(0, 63)),
        st.tuples(st.just("add"), st.sampled_from(ADDABLE), st.integers(1, 3), st.integers(0, 2)),
        st.tuples(st.just("remove"), st.sampled_from(NAMES), st.integers(0, 2)),
        st.tuples(st.just("drain"), st.sampled_from(NAMES), st.integers(0, 2)),
        st.tuples(st.just("undrain"), st.sampled_from(NAMES), st.integers(0, 2)),
        st.tuples(st.just("slots"), st.sampled_from(NAMES), st.integers(1, 3), st.integers(0, 2)),
        st.tuples(st.just("reload"), st.booleans(), st.booleans(), st.integers(0, 2)),
    ),
    min_size=5,
    max_size=30,
)


async def settle(fleet: list[Member], model: Model) -> None:
    """Let grants, claims and releases run until nothing moves (bounded)."""
    last: Any = None
    with anyio.fail_after(10):
        while True:
            await anyio.sleep(0.01 if fleet[0].pool.shared else 0)
            for _ in range(10):
                await anyio.lowlevel.checkpoint()
            now = (
                len(model.held),
                len(model.outcomes),
                [m.pool.snapshot()["shared_state"] for m in fleet],
                [m.pool.scheduler.waiting for m in fleet],
            )
            if now == last:
                return
            last = now


async def run(ops: list[tuple[Any, ...]], fleet: list[Member], path: Path, state: str | None) -> Model:
    model = Model()
    for name, slots in CONFIGURED.items():
        model.slots_now(name, slots)
    async with anyio.create_task_group() as group:
        for op in ops:
            model.step += 1
            await apply(op, fleet, path, state, model, group)
            for member in fleet:
                await member.changes.catch_up()
            observe(fleet, model)
            await settle(fleet, model)
            check(fleet, model)
        await finish(fleet, path, state, model)
    return model


async def apply(
    op: tuple[Any, ...], fleet: list[Member], path: Path, state: str | None, model: Model, group: TaskGroup
) -> None:
    kind = op[0]
    if kind == "acquire":
        scope = anyio.CancelScope()
        model.waiting.append(scope)
        model.started += 1
        group.start_soon(acquire, fleet[op[1] % len(fleet)], scope, model)
        return
    if kind == "release":
        live = [(lease, step) for lease, step in model.held if id(lease) not in model.released]
        if live:
            lease, _ = live[op[1] % len(live)]
            model.released.add(id(lease))
            lease.release()
            lease.release()  # a second release changes nothing
        return
    if kind == "cancel":
        if model.waiting:
            model.waiting.pop(op[1] % len(model.waiting)).cancel()
        return
    changes, intent = fleet[op[-1] % len(fleet)].changes, model.intent
    known = op[1] in intent.slots()
    # What this step may return to service may be granted during it, before ``observe`` sees it.
    if kind in ("add", "undrain"):
        model.gone_since.pop(op[1], None)
    elif kind == "reload":
        model.gone_since.clear()
    try:
        if kind == "add":
            await changes.add({"url": f"http://{op[1]}", "slots": op[2], "models": ["m"]}, who="test")
            intent.added[op[1]] = op[2]
            intent.removed.discard(op[1])
        elif kind == "remove":
            if known:  # it answers when drained: meanwhile, more happens
                group.start_soon(partial(changes.remove, op[1], who="test"))
                await wait_removed(changes, op[1])
            else:
                await changes.remove(op[1], who="test")
            intent.added.pop(op[1], None)
            intent.patched.pop(op[1], None)
            intent.drained.discard(op[1])
            if op[1] in intent.file:
                intent.removed.add(op[1])
        elif kind == "drain":
            await changes.drain(op[1], who="test")
            intent.drained.add(op[1])
        elif kind == "undrain":
            await changes.undrain(op[1], who="test")
            intent.drained.discard(op[1])
        elif kind == "slots":
            await changes.patch(op[1], {"slots": op[2]}, who="test")
            if op[1] in intent.added:
                intent.added[op[1]] = op[2]
            else:
                intent.patched[op[1]] = op[2]
        elif kind == "reload":
            halved = {name: max(1, n // 2) for name, n in CONFIGURED.items()} if op[1] else CONFIGURED
            await anyio.Path(path).write_text(config_text(halved, state))
            await changes.reload(reset=op[2], who="test", fleet_wide=True)
            for member in fleet:  # as the others do when they hear of it (or get their SIGHUP)
                if member.changes is not changes:
                    await member.changes.reload(who="test")
            intent.file = dict(halved)
            if op[2]:
                intent.reset()
    except ChangeRefused as refused:
        status: int | None = refused.status
    else:
        status = None
    assert status in (None, 404), (op, status)
    assert status is None or not known, op


async def wait_removed(changes: FleetChanges, name: str) -> None:
    """Until the removal is applied here (before its drain ends)."""
    with anyio.fail_after(5):
        while changes.describe(name)["admin_state"] not in ("removed", "draining", "drained"):
            await anyio.lowlevel.checkpoint()


async def acquire(member: Member, scope: anyio.CancelScope, model: Model) -> None:
    with scope:
        try:
            lease = await member.pool.acquire("m", timeout=60)
        except PoolError as exc:
            model.outcomes.append(type(exc).__name__)
        else:
            model.outcomes.append("granted")
            gone = model.gone_since.get(lease.backend)
            # A grant seen after the step that made every process know the backend is draining
            # or gone (that step's own grants may have been claimed just before).
            assert gone is None or model.step <= gone, (lease.backend, gone, model.step)
            model.held.append((lease, model.step))
    if scope.cancelled_caught:
        model.outcomes.append("cancelled")
    if scope in model.waiting:
        model.waiting.remove(scope)


def observe(fleet: list[Member], model: Model) -> None:
    """After every process applied the step's change: every one serves what was asked for."""
    wanted, drained = model.intent.slots(), model.intent.drained
    for member in fleet:
        shown = {b["name"]: b for b in member.pool.snapshot()["backends"]}
        for name in NAMES:
            if name in wanted:
                assert shown[name]["slots"] == wanted[name], (name, shown[name], wanted)
                state = shown[name]["admin_state"]
                assert (state == "active") == (name not in drained), (name, state, drained)
            else:
                assert name not in shown or shown[name]["admin_state"] != "active", (name, shown)
    for name in NAMES:
        if name in wanted:
            model.slots_now(name, wanted[name])
        if name in wanted and name not in drained:
            model.gone_since.pop(name, None)
        else:
            model.gone_since.setdefault(name, model.step)


def check(fleet: list[Member], model: Model) -> None:
    live: dict[str, list[int]] = {}
    for lease, step in model.held:
        if id(lease) not in model.released:
            live.setdefault(lease.backend, []).append(step)
    for name, steps in live.items():
        assert len(steps) <= model.allowed(name, min(steps)), (name, steps, model.slots.get(name))


async def finish(fleet: list[Member], path: Path, state: str | None, model: Model) -> None:
    """Back to the file's fleet, every lease given back: every waiter is answered and nothing is held."""
    await anyio.Path(path).write_text(config_text(CONFIGURED, state))
    model.step += 1
    model.gone_since.clear()
    await fleet[0].changes.reload(reset=True, who="test", fleet_wide=True)
    for member in fleet[1:]:
        await member.changes.reload(who="test")
    for member in fleet:
        await member.changes.catch_up()
    model.intent = Intent()
    observe(fleet, model)
    with anyio.fail_after(30):
        while model.waiting or any(id(lease) not in model.released for lease, _ in model.held):
            for lease, _ in model.held:
                if id(lease) not in model.released:
                    model.released.add(id(lease))
                    lease.release()
            await settle(fleet, model)
    assert len(model.outcomes) == model.started  # none lost
    for member in fleet:
        for backend in member.pool.scheduler.backends.values():
            assert backend.active_total == 0, backend.name


def stored_leases(store: Store) -> int:
    return sum(store.leases(name) for name in NAMES)


# Found by hypothesis: every backend removed, then the file's named again; the health monitor's
# task group had ended with its last poll, so nothing probed them and a waiter waited forever.
EVERY_BACKEND_REMOVED = [
    ("acquire", 1), ("acquire", 0), ("release", 23), ("release", 19), ("acquire", 0), ("acquire", 0),
    ("acquire", 1), ("release", 56), ("slots", "d:8080", 1, 1), ("remove", "a:8080", 0),
    ("remove", "b:8080", 2), ("cancel", 2), ("release", 20), ("release", 62), ("add", "c:8080", 2, 0),
    ("acquire", 1), ("reload", True, True, 2), ("slots", "a:8080", 1, 1), ("acquire", 2), ("cancel", 45),
]  # fmt: skip


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
@example(ops=EVERY_BACKEND_REMOVED)
async def test_one_process_holds_its_slots_through_random_changes(tmp_path: Path, ops: list[Any]) -> None:
    async with fleet_of(tmp_path, 1, None) as (fleet, path):
        await run(ops, fleet, path, None)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
async def test_three_pools_on_one_store_hold_the_slots_through_random_changes(
    tmp_path: Path, store: Store, ops: list[Any]
) -> None:
    import redis

    redis.Redis(port=store.port).flushall()
    async with fleet_of(tmp_path, 3, store.url) as (fleet, path):
        await run(ops, fleet, path, store.url)
        with anyio.fail_after(10):
            while stored_leases(store):
                await anyio.sleep(0.02)
