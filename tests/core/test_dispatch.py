"""Dispatch: a new request granted without being queued first decides exactly as if it had been
queued and placed (``Dispatch.grant_new`` is a shortcut, never a second policy)."""

from __future__ import annotations

from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from local_inference_pool.core.prompt_index import prompt_of
from local_inference_pool.core.scheduler import Grant, Health, Scheduler, Ticket
from local_inference_pool.errors import PoolError

MODELS = ["m0", "m1", "m2"]
PROMPTS = [None, ["a shared system prompt " * 30, "question one"], ["a shared system prompt " * 30, "two"]]

steps = st.lists(
    st.one_of(
        st.tuples(
            st.just("submit"),
            st.sampled_from(MODELS),
            st.sampled_from([None, "s1", "s2"]),
            st.integers(0, len(PROMPTS) - 1),
            st.integers(-1, 1),
        ),
        st.tuples(st.just("release"), st.integers(0, 50)),
        st.tuples(st.just("tick"), st.floats(0.0, 20.0)),
        st.tuples(st.just("health"), st.sampled_from(["a", "b", "c"]), st.booleans()),
    ),
    max_size=60,
)


def run(script: list[tuple[Any, ...]], *, shortcut: bool) -> list[tuple[Any, ...]]:
    now = [1000.0]
    s = Scheduler(clock=lambda: now[0], starvation_bound=15.0, cache_wait_max=4.0, prefix_min_tokens=16)
    if not shortcut:
        s.dispatch.grant_new = lambda ticket: False  # type: ignore[method-assign]
    s.add_backend("a", "http://a", slots=2, models=MODELS[:2], resident=["m0"])
    s.add_backend("b", "http://b", slots=1, models=MODELS, resident=["m1"])
    s.add_backend("c", "http://c", slots=2, models=MODELS[1:], max_loaded_models=2)
    tickets: list[Ticket] = []
    held: list[Grant] = []
    seen: list[tuple[Any, ...]] = []

    def note() -> None:
        events = s.take_events()
        for ticket in events.granted:
            assert ticket.grant is not None
            held.append(ticket.grant)
            seen.append(("granted", ticket.id, ticket.grant.backend.name, ticket.grant.affinity))
        seen.extend(("held", t.id, t.held_for.name if t.held_for else None) for t in events.held)
        seen.extend(("failed", t.id) for t in events.failed)

    for step in script:
        if step[0] == "submit":
            _, model, session, prompt, priority = step
            parts = PROMPTS[prompt]
            try:
                ticket = s.submit(
                    model,
                    session=session,
                    priority=priority,
                    prompt=None if parts is None else prompt_of(parts, model=model),
                )
            except PoolError as exc:  # refused the same way on both sides
                seen.append(("refused", type(exc).__name__))
                continue
            tickets.append(ticket)
            seen.append(("submitted", ticket.id, ticket.state.value))
        elif step[0] == "release" and held:
            s.release(held.pop(step[1] % len(held)))
        elif step[0] == "tick":
            now[0] += step[1]
            s.refresh()
        elif step[0] == "health":
            s.update_backend(step[1], health=Health.HEALTHY if step[2] else Health.UNHEALTHY)
        note()
    seen.append(("end", s.snapshot()["stats"], sorted((t.id, t.state.value) for t in tickets)))
    return seen


@settings(max_examples=500, deadline=None)
@given(steps)
@example([("submit", "m0", None, 0, 0)] * 3)  # the third would have to evict m1 on b: it waits
@example([("submit", "m1", "s1", 1, 0)] * 4 + [("release", 0), ("submit", "m1", "s1", 2, 0)])
def test_granting_a_new_request_at_once_decides_as_queueing_it_would(
    script: list[tuple[Any, ...]],
) -> None:
    assert run(script, shortcut=True) == run(script, shortcut=False)
