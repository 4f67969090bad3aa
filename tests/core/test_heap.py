"""The ticket heap: the order of a plain heap, removal from the middle, and a bounded footprint."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from local_inference_pool.core.heap import TicketHeap


@dataclass(eq=False)
class Item:
    id: int


operations = st.lists(
    st.tuples(st.sampled_from(["push", "discard", "pop"]), st.integers(0, 40), st.integers(0, 5)),
    max_size=400,
)


@given(operations)
def test_it_orders_like_a_sorted_list_and_forgets_what_is_withdrawn(
    steps: list[tuple[str, int, int]],
) -> None:
    heap: TicketHeap[Item] = TicketHeap()
    items = {i: Item(i) for i in range(41)}
    model: dict[int, int] = {}  # id -> key: the one live entry of each item
    for action, ident, key in steps:
        item = items[ident]
        if action == "push":
            heap.push(key, item)
            model[ident] = key
        elif action == "discard":
            assert heap.discard(item) is (ident in model)
            model.pop(ident, None)
        else:
            popped = heap.pop()
            if not model:
                assert popped is None
            else:
                assert popped is not None
                assert model[popped.id] == min(model.values())
                del model[popped.id]
        assert len(heap) == len(model)
        assert sorted(i.id for i in heap) == sorted(model)
        assert heap.footprint <= 2 * len(model) + 33  # dead entries never outnumber the live by much
        expected = min(model.values()) if model else None
        assert heap.peek_key() == expected


def test_a_queue_that_never_empties_keeps_only_what_is_in_it() -> None:
    heap: TicketHeap[Item] = TicketHeap()
    for ident in range(100_000):  # two live entries at any time, each withdrawn from the middle
        heap.push((ident % 7, ident), Item(ident))
        if ident >= 2:
            heap.discard(Item(ident - 2))
    assert len(heap) == 2
    assert heap.footprint <= 40


def test_equal_keys_never_compare_the_items() -> None:
    heap: TicketHeap[Item] = TicketHeap()
    item = Item(1)
    heap.push((0, 1.0, 1), item)
    heap.push((0, 1.0, 1), item)  # queued again in its place: the old entry dies, nothing raises
    heap.push((0, 1.0, 1), Item(2))
    assert heap.pop() is item
    assert len(heap) == 1
