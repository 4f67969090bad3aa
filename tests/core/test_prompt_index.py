from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from local_inference_pool.core.prompt_index import BLOCK_CHARS, MAX_BLOCKS, Ewma, PrefixIndex, prompt_of


def test_prompts_that_share_a_start_share_its_full_blocks_and_no_more() -> None:
    start = "s" * (BLOCK_CHARS * 3 + 10)
    one = prompt_of([start, "first question"], model="m")
    two = prompt_of([start, "second question, longer"], model="m")
    assert one.blocks[:3] == two.blocks[:3]
    assert one.blocks[3:] != two.blocks[3:] or len(one.blocks) == 3
    assert one.chars == len(start) + len("first question")
    assert one.history_chars == len(start)


def test_the_same_text_for_another_model_shares_nothing() -> None:
    text = ["x" * BLOCK_CHARS * 4]
    assert not set(prompt_of(text, model="a").blocks) & set(prompt_of(text, model="b").blocks)


def test_a_single_part_has_no_history_and_a_huge_prompt_is_indexed_up_to_the_bound() -> None:
    assert prompt_of(["only"], model="m").history_chars == 0
    huge = prompt_of(["y" * BLOCK_CHARS * (MAX_BLOCKS + 10)], model="m")
    assert len(huge.blocks) == MAX_BLOCKS


@given(st.text(max_size=3000), st.text(max_size=3000))
def test_the_shared_blocks_are_exactly_the_common_full_blocks(a: str, b: str) -> None:
    one, two = prompt_of([a], model="m"), prompt_of([b], model="m")
    common = 0
    while (common + 1) * BLOCK_CHARS <= min(len(a), len(b)) and a[: (common + 1) * BLOCK_CHARS] == b[
        : (common + 1) * BLOCK_CHARS
    ]:
        common += 1
    index = PrefixIndex(capacity=1000)
    index.record(one.blocks)
    assert index.match(two.blocks) == common


def test_the_index_matches_leading_blocks_and_forgets_the_least_recently_used() -> None:
    index = PrefixIndex(capacity=4)
    index.record([1, 2, 3])
    assert index.match([1, 2, 3, 4]) == 3
    assert index.match([2, 3]) == 2
    assert index.match([9, 1]) == 0
    index.record([1, 5])  # 1 used again; 2 is now the oldest
    index.record([6])
    assert len(index) == 4
    assert index.match([2]) == 0
    assert index.match([1, 5]) == 2
    index.resize(2)
    assert len(index) == 2
    assert index.match([5, 6]) == 2


def test_a_prompt_longer_than_the_index_keeps_its_first_blocks() -> None:
    index = PrefixIndex(capacity=3)
    index.record(list(range(10)))
    assert index.match(list(range(10))) == 3


def test_a_mean_starts_at_its_first_sample_then_moves_by_its_weight() -> None:
    mean = Ewma(weight=0.5)
    assert mean.get(7.0) == 7.0
    mean.add(2.0)
    mean.add(4.0)
    assert mean.get(7.0) == 3.0
