"""The fleet's key limits in a real Redis: the Lua scripts decide as the in-process limiter does,
and a store that goes away costs a clear 503, never a 500 nor a hung request."""

from __future__ import annotations

import secrets
import time

import anyio
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from local_inference_pool.config import KeyConfig
from local_inference_pool.core.limits import Admitted, KeyLimiter, Limits, Ticket
from local_inference_pool.pool.shared_keys import SharedKeys

from ..fakes import FakeBackend, Fleet
from ..gateway.test_app import CHAT, assert_openai_error, client_for
from ..redis_store import Store

pytestmark = pytest.mark.anyio

_LIMITS = st.builds(
    Limits,
    rpm=st.one_of(st.none(), st.integers(0, 5)),
    tpm=st.one_of(st.none(), st.integers(0, 300)),
    budget=st.one_of(st.none(), st.integers(0, 300)),
    period=st.just("day"),
)
_STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("admit"), st.integers(0, 120)),
        st.tuples(st.just("settle"), st.integers(0, 20), st.one_of(st.none(), st.integers(0, 150))),
    ),
    max_size=25,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(limits=_LIMITS, steps=_STEPS)
async def test_the_lua_scripts_decide_as_the_in_process_limiter(
    store: Store, limits: Limits, steps: list[tuple[object, ...]]
) -> None:
    """The same requests, within one minute, against both: the same verdicts and the same standing."""
    shared = SharedKeys(store.url)
    key = secrets.token_hex(6)  # a key of this example's own
    local = KeyLimiter()
    open_tickets: list[tuple[Ticket, Ticket]] = []
    try:
        for index, step in enumerate(steps):
            now = time.time()
            if step[0] == "admit":
                estimate = int(step[1])  # type: ignore[call-overload]
                mine = local.admit(key, limits, estimate, now)
                theirs = await shared.admit(key, limits, estimate, f"r{index}", now)
                assert type(mine) is type(theirs)
                if isinstance(mine, Admitted) and isinstance(theirs, Admitted):
                    open_tickets.append((mine.ticket, theirs.ticket))
                    assert (
                        mine.standing.requests_left,
                        mine.standing.tokens_left,
                        mine.standing.budget_left,
                    ) == (
                        theirs.standing.requests_left,
                        theirs.standing.tokens_left,
                        theirs.standing.budget_left,
                    )
                else:
                    assert mine.limit == theirs.limit  # type: ignore[union-attr]
            elif open_tickets:
                mine_ticket, their_ticket = open_tickets.pop(int(step[1]) % len(open_tickets))  # type: ignore[call-overload]
                used = step[2]
                local.settle(mine_ticket, used, limits, now)  # type: ignore[arg-type]
                await shared.settle(their_ticket, used, limits, now)  # type: ignore[arg-type]
    finally:
        await shared.aclose()


async def test_a_store_that_goes_away_is_a_503_and_limits_hold_again_when_it_is_back(store: Store) -> None:
    fleet = Fleet(a=FakeBackend())
    key = KeyConfig(name="team", key="sk-team-secret", rpm=2)
    headers = {"authorization": "Bearer sk-team-secret"}
    async with client_for(fleet, state=store.url, keys=(key,), public_status=True) as client:
        assert (await client.post("/chat/completions", json=CHAT, headers=headers)).status_code == 200
        store.stop()
        away = await client.post("/chat/completions", json=CHAT, headers=headers)
        store.start()  # empty: it kept nothing
        with anyio.fail_after(10):
            while not fleet_wide(await client.get("/pool/status")):
                await anyio.sleep(0.05)
        answers = [await client.post("/chat/completions", json=CHAT, headers=headers) for _ in range(4)]
    assert_openai_error(away, 503, "state_unavailable")
    assert [answer.status_code for answer in answers] == [200, 200, 429, 429]


def fleet_wide(status: httpx.Response) -> bool:
    shown = status.json()
    return bool(shown["key_limits"] == "fleet" and shown["shared_state"]["reachable"])
