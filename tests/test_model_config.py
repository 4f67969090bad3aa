"""``[[models]]``: names and aliases, checked as the file is read, and resolved most specific first."""

from __future__ import annotations

import datetime as dt

import pytest

from local_inference_pool.config import PoolConfig
from local_inference_pool.errors import ConfigError
from local_inference_pool.model_config import ModelConfig, ModelNames, Resolved


def names(*models: ModelConfig) -> ModelNames:
    return ModelNames(PoolConfig(models=models).models)


def test_exact_aliases_then_patterns_most_specific_first() -> None:
    resolver = names(
        ModelConfig("qwen2.5-7b", ("gpt-4o", "gpt-*")),
        ModelConfig("qwen2.5-coder", ("claude-*", "gpt-5*")),
        ModelConfig("gemma-3", ("claude-haiku-*", "*")),
    )
    assert resolver.resolve("gpt-4o") == Resolved("qwen2.5-7b", "gpt-4o")
    assert resolver.resolve("gpt-5.1-codex") == Resolved(
        "qwen2.5-coder", "gpt-5*"
    )  # 'gpt-5' is longer than 'gpt-'
    assert resolver.resolve("gpt-4.1") == Resolved("qwen2.5-7b", "gpt-*")
    assert resolver.resolve("claude-haiku-4-5") == Resolved("gemma-3", "claude-haiku-*")
    assert resolver.resolve("claude-opus-4-1") == Resolved("qwen2.5-coder", "claude-*")
    assert resolver.resolve("anything") == Resolved("gemma-3", "*")
    assert resolver.resolve("qwen2.5-7b") is None  # a model's own name, though '*' matches it
    assert resolver.exact_aliases() == {"gpt-4o": "qwen2.5-7b"}


def test_without_models_nothing_resolves() -> None:
    resolver = names()
    assert not resolver
    assert resolver.resolve("gpt-4o") is None


def test_patterns_of_equal_specificity_go_in_the_order_given() -> None:
    resolver = names(ModelConfig("a", ("x*z",)), ModelConfig("b", ("x?z", "xy*")))
    assert resolver.resolve("xyz") == Resolved("a", "x*z")


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (
            [{"name": "a", "aliases": ["b"]}, {"name": "b"}],
            r"models\[0\].aliases: 'b' is not allowed; it shadows models\[1\].name",
        ),
        (
            [{"name": "a", "aliases": ["x"]}, {"name": "b", "aliases": ["x"]}],
            r"models\[1\].aliases: 'x' .* shadows models\[0\].aliases",
        ),
        ([{"name": "a"}, {"name": "a"}], r"models\[1\].name: 'a' is given twice"),
        (
            [{"name": "a", "aliases": ["gpt-[z-a]*"]}],
            r"models\[0\].aliases: 'gpt-\[z-a\]\*' .* matches no name",
        ),
        ([{"name": "a", "reload": True}], r"models\[0\]: unknown key 'reload'; known keys: name, aliases"),
        ([{"name": "a", "preload": "s1"}], r"models\[0\].preload: 's1' is not allowed; expected a list"),
        ([{"name": "a", "idle_unload": 0}], r"models\[0\].idle_unload: .* a number > 0"),
        ([{"name": "a", "load_after": "soon"}], r"models\[0\].load_after: .* a number > 0"),
        ([{"name": "a", "fallback_after": -1}], r"models\[0\].fallback_after: .* a number > 0"),
        ([{"name": "a", "fallbacks": "b"}], r"models\[0\].fallbacks: 'b' is not allowed; expected a list"),
        ([{"aliases": ["x"]}], r"models\[0\].name: missing"),
        (
            [{"name": "a", "aliases": "gpt-*"}],
            r"models\[0\].aliases: 'gpt-\*' is not allowed; expected a list",
        ),
        (
            [{"name": "a", "aliases": ["ok", ""]}],
            r"models\[0\].aliases: .* expected a list of non-empty strings",
        ),
        ([{"name": "a", "aliases": ["bad\r\nname"]}], r"models\[0\].aliases: .* expected a printable name"),
        ([{"name": "a\nb"}], r"models\[0\].name: .* expected a printable name"),
        ({"name": "a"}, r"models: .* expected an array of tables"),
        (
            [{"name": "a", "params": {"set": {"stream": False}}}],
            r"models\[0\].params: 'stream' may not be set or stripped",
        ),
        (
            [{"name": "a", "params": {"strip": ["model"]}}],
            r"models\[0\].params: 'model' may not be set or stripped",
        ),
        (
            [{"name": "a", "params": {"set": {"since": dt.date(2026, 1, 1)}}}],
            r"models\[0\].params.set: every value must be JSON",
        ),
        (
            [{"name": "a", "params": {"add": {}}}],
            r"models\[0\].params: unknown key 'add'; known keys: set, strip",
        ),
        (
            [{"name": "a", "params": {"set": [1]}}],
            r"models\[0\].params.set: .* expected a table of request fields",
        ),
        ([{"name": "a", "params": {"strip": "logprobs"}}], r"models\[0\].params.strip: .* expected a list"),
    ],
)
def test_a_bad_models_section_is_refused_in_one_line_naming_the_key(section: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as refused:
        PoolConfig.from_dict({"models": section})
    assert len(str(refused.value).splitlines()) == 1


def test_params_set_fields_then_strip_fields() -> None:
    model = PoolConfig.from_dict(
        {
            "models": [
                {
                    "name": "m",
                    "params": {"set": {"temperature": 0.2, "top_k": 40}, "strip": ["logprobs", "top_k"]},
                }
            ]
        }
    ).models[0]
    given = {"model": "m", "temperature": 1.0, "logprobs": True, "messages": []}
    assert model.adjust(given) == {"model": "m", "temperature": 0.2, "messages": []}
    assert given["temperature"] == 1.0  # the client's payload is left as it was
    assert names(model).params_of("m") is model
    assert names(ModelConfig("n")).params_of("n") is None


@pytest.mark.parametrize(
    ("serve_as", "message"),
    [
        ({"gpu9": "qwen:7b"}, r"models\[0\].serve_as: 'gpu9' is neither a backend's name nor a kind"),
        ({"gpu0": ""}, r"models\[0\].serve_as: .* expected a table of backend name or kind = model id"),
        (["gpu0"], r"models\[0\].serve_as: .* expected a table"),
    ],
)
def test_a_bad_serve_as_is_refused_naming_the_key(serve_as: object, message: str) -> None:
    data = {
        "backends": [{"url": "http://127.0.0.1:1", "name": "gpu0"}],
        "models": [{"name": "q", "serve_as": serve_as}],
    }
    with pytest.raises(ConfigError, match=message):
        PoolConfig.from_dict(data)


def test_one_id_on_one_server_is_one_model() -> None:
    with pytest.raises(ConfigError, match=r"models\[1\].serve_as: ollama = 'q:7b' is already a's"):
        PoolConfig(
            models=(
                ModelConfig("a", serve_as=(("ollama", "q:7b"),)),
                ModelConfig("b", serve_as=(("ollama", "q:7b"),)),
            )
        )


def test_serve_as_maps_ids_both_ways_by_backend_name_before_kind() -> None:
    resolver = names(ModelConfig("qwen", serve_as=(("gpu0", "qwen.gguf"), ("ollama", "qwen:7b"))))
    assert resolver.renames
    assert resolver.canonical("gpu0", "llamacpp", "qwen.gguf") == "qwen"
    assert resolver.canonical("box", "ollama", "qwen:7b") == "qwen"
    assert resolver.canonical("box", "llamacpp", "qwen:7b") == "qwen:7b"  # not this kind's
    assert resolver.upstream_id("qwen", "gpu0", "ollama") == "qwen.gguf"
    assert resolver.upstream_id("qwen", "box", "ollama") == "qwen:7b"
    assert resolver.upstream_id("qwen", "box", "vllm") == "qwen"
    assert resolver.upstream_id("other", "gpu0", "ollama") == "other"


def test_a_fallback_loop_is_refused_naming_it() -> None:
    section = [
        {"name": "a", "fallbacks": ["b"]},
        {"name": "b", "fallbacks": ["c", "a"]},
        {"name": "c"},
    ]
    with pytest.raises(ConfigError, match=r"^models\[0\].fallbacks: a loop: a -> b -> a$"):
        PoolConfig.from_dict({"models": section})
    with pytest.raises(ConfigError, match=r"models\[0\].fallbacks: a loop: a -> a"):
        PoolConfig.from_dict({"models": [{"name": "a", "fallbacks": ["a"]}]})


def test_fallbacks_are_tried_depth_first_each_once() -> None:
    resolver = names(
        ModelConfig("a", fallbacks=("b", "c"), fallback_after=30),
        ModelConfig("b", fallbacks=("d", "c")),
    )
    assert resolver.candidates("a") == [("a", 30.0), ("b", None), ("d", None), ("c", None)]
    assert resolver.falls_back("a")
    assert not resolver.falls_back("c")


def test_where_a_model_lives_is_read_and_a_preload_must_name_a_backend() -> None:
    data: dict[str, object] = {
        "backends": [{"url": "http://127.0.0.1:1", "name": "gpu0"}],
        "models": [
            {"name": "q", "preload": ["gpu0"], "idle_unload": 600, "load_after": 5},
            {"name": "r", "preload": True},
            {"name": "s"},
        ],
    }
    q, r, s = PoolConfig.from_dict(data).models
    assert (q.preload, q.idle_unload, q.load_after, q.places) == (("gpu0",), 600, 5, True)
    assert (r.preload, r.places, s.places) == (True, True, False)
    data["models"] = [{"name": "q", "preload": ["gpu9"]}]
    with pytest.raises(ConfigError, match=r"models\[0\].preload: 'gpu9' is not a backend's name"):
        PoolConfig.from_dict(data)
