from __future__ import annotations

import local_inference_pool


def test_all_is_sorted_and_exactly_the_public_names() -> None:
    exported = local_inference_pool.__all__
    assert exported == sorted(exported)
    public = {name for name in vars(local_inference_pool) if not name.startswith("_")}
    modules = {name for name in public if type(getattr(local_inference_pool, name)).__name__ == "module"}
    assert set(exported) == public - modules
