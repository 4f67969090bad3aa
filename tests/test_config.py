from __future__ import annotations

import re
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest

from local_inference_pool import BackendConfig, ConfigError, PoolConfig, load_config
from local_inference_pool.config import (
    BACKEND_KEYS,
    KEY_KEYS,
    MODEL_KEYS,
    POOL_KEYS,
    ROUTE_KEYS,
    normalize_url,
)
from local_inference_pool.telemetry_config import TELEMETRY_KEYS

EXAMPLE = """
[pool]
queue_limit = 1000
queue_timeout = 600
health_interval = 5.0
api_keys = ["sk-local-1"]
public_status = false

[[backends]]
url = "http://127.0.0.1:8080"
name = "gpu0"
kind = "llamacpp"
slots = 4
models = ["qwen2.5-7b"]
max_loaded_models = 1
weight = 1.0
api_key = "backend-secret"

[[backends]]
url = "http://127.0.0.1:1234/v1/"
"""


def test_issue_example_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "pool.toml"
    path.write_text(EXAMPLE)
    config = PoolConfig.from_toml(path)
    assert config.queue_limit == 1000
    assert config.queue_timeout == 600.0
    assert config.api_keys == ("sk-local-1",)
    gpu0, second = config.backends
    assert (gpu0.name, gpu0.kind, gpu0.slots, gpu0.models) == ("gpu0", "llamacpp", 4, ("qwen2.5-7b",))
    assert gpu0.api_key == "backend-secret"
    assert (second.url, second.name, second.slots, second.models) == (
        "http://127.0.0.1:1234",
        "127.0.0.1:1234",
        None,
        None,
    )


def test_defaults_wait_forever_and_are_frozen() -> None:
    config = PoolConfig()
    assert config.queue_timeout is None
    with pytest.raises(FrozenInstanceError):
        config.queue_limit = 3  # type: ignore[misc]


def test_secrets_stay_out_of_repr() -> None:
    config = PoolConfig(
        api_keys=("sk-inbound",), backends=(BackendConfig(url="http://a:1", api_key="sk-out"),)
    )
    assert "sk-inbound" not in repr(config)
    assert "sk-out" not in repr(config)


@pytest.mark.parametrize(
    ("url", "normal"),
    [
        ("http://h:8080", "http://h:8080"),
        ("http://h:8080/", "http://h:8080"),
        ("http://h:8080/v1", "http://h:8080"),
        (" http://h:8080/v1/ ", "http://h:8080"),
        ("https://h/prefix/v1", "https://h/prefix"),
    ],
)
def test_url_spellings_mean_one_server(url: str, normal: str) -> None:
    assert normalize_url(url) == normal


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"pool": {"queue_limt": 1}}, "pool: unknown key 'queue_limt' (did you mean 'queue_limit'?)"),
        ({"pol": {}}, "config: unknown key 'pol' (did you mean 'pool'?)"),
        ({"backends": [{"url": "http://a", "slotz": 1}]}, "backends[0]: unknown key 'slotz'"),
        ({"backends": [{"url": "ftp://a"}]}, "backends[0].url: 'ftp://a' is not allowed; the scheme must be"),
        ({"backends": [{"url": "http://"}]}, "backends[0].url: 'http://' is not allowed; it names no host"),
        ({"backends": [{"url": "http://a:99999"}]}, "the port is not a number"),
        ({"backends": [{"slots": 1}]}, "backends[0].url: missing"),
        ({"backends": [{"url": "http://a", "slots": 0}]}, "backends[0].slots: 0 is not allowed; expected an integer >= 1"),
        ({"backends": [{"url": "http://a", "slots": True}]}, "backends[0].slots: True is not allowed"),
        ({"backends": [{"url": "http://a", "kind": "tgi"}]}, "backends[0].kind: 'tgi' is not allowed; expected one of auto | llamacpp"),
        ({"backends": [{"url": "http://a", "weight": 0}]}, "backends[0].weight: 0 is not allowed; expected a number > 0"),
        ({"backends": [{"url": "http://a", "models": "m"}]}, "backends[0].models: 'm' is not allowed; expected a list"),
        ({"backends": ["http://a", "http://a/v1"]}, "backends[1].url: 'http://a' is not allowed; it duplicates backends[0]"),
        ({"backends": [{"url": "http://a", "name": "x"}, {"url": "http://b", "name": "x"}]}, "backends[1].name: 'x' is not allowed; it duplicates"),
        ({"pool": {"queue_timeout": -1}}, "pool.queue_timeout: -1 is not allowed; expected a number > 0 (omit it for no limit)"),
        ({"pool": {"health_interval": 0}}, "pool.health_interval: 0 is not allowed"),
        ({"pool": {"queue_limit": 1.5}}, "pool.queue_limit: 1.5 is not allowed; expected an integer >= 0"),
        ({"pool": {"public_status": "yes"}}, "pool.public_status: 'yes' is not allowed; expected true or false"),
        ({"pool": {"api_keys": "sk"}}, "pool.api_keys: 'sk' is not allowed; expected a list"),
        ({"pool": {"api_keys": ["sk 1"]}}, "pool.api_keys[0]: a key with spaces or non-ASCII characters is not allowed"),
        ({"backends": [{"url": "http://a", "api_key": "kéy"}]}, "backends[0].api_key: a key with spaces or non-ASCII"),
        ({"pool": {"starvation_bound": float("nan")}}, "pool.starvation_bound: nan is not allowed"),
        ({"pool": []}, "pool: [] is not allowed; expected a table"),
        ({"backends": {"url": "http://a"}}, "backends: {'url': 'http://a'} is not allowed; expected an array"),
    ],
)  # fmt: skip
def test_every_invalid_value_names_field_value_and_what_is_allowed(
    data: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        PoolConfig.from_dict(data)
    assert message in str(caught.value)


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(ConfigError, match=r"pool\.queue_limit: -1"):
        PoolConfig(queue_limit=-1)
    with pytest.raises(ConfigError, match=r"slots: 0 is not allowed"):
        BackendConfig(url="http://a:1", slots=0)
    assert BackendConfig(url="http://a:1", models=["m"]).models == ("m",)  # type: ignore[arg-type]


def test_file_errors_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        PoolConfig.from_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[pool\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        PoolConfig.from_toml(bad)


def test_environment_overrides_the_file_and_adds_backends(tmp_path: Path) -> None:
    path = tmp_path / "pool.toml"
    path.write_text(EXAMPLE)
    env = {
        "LIP_CONFIG": str(path),
        "LIP_QUEUE_TIMEOUT": "none",
        "LIP_QUEUE_LIMIT": "7",
        "LIP_PUBLIC_STATUS": "yes",
        "LIP_API_KEYS": "k1, k2",
        "LIP_BACKENDS": "http://10.0.0.5:8000/v1,",
        "LOCAL_INFERENCE_SERVER_2": "http://old-two:1234",
        "LOCAL_INFERENCE_SERVER_1": "http://old-one:1234",
        "LOCAL_INFERENCE_SERVER_1_KEY": "old-key",
    }
    config = load_config(environ=env)
    assert (config.queue_timeout, config.queue_limit, config.public_status) == (None, 7, True)
    assert config.api_keys == ("k1", "k2")
    assert [b.url for b in config.backends] == [
        "http://127.0.0.1:8080",
        "http://127.0.0.1:1234",
        "http://10.0.0.5:8000",
        "http://old-one:1234",
        "http://old-two:1234",
    ]
    assert config.backends[3].api_key == "old-key"
    assert config.backends[4].api_key is None


def test_environment_values_are_validated_with_their_variable_name() -> None:
    with pytest.raises(ConfigError, match="LIP_QUEUE_LIMIT: 'lots' is not allowed"):
        load_config(environ={"LIP_QUEUE_LIMIT": "lots"})
    with pytest.raises(ConfigError, match="LOCAL_INFERENCE_SERVER_1: 'gpu0' is not allowed"):
        load_config(environ={"LOCAL_INFERENCE_SERVER_1": "gpu0"})


def test_no_file_and_no_environment_is_the_defaults() -> None:
    assert load_config(environ={}) == PoolConfig()


def test_readme_documents_every_key() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    reference = readme[readme.index("## Configuration") :]
    for key in [*POOL_KEYS, *BACKEND_KEYS, *KEY_KEYS, *ROUTE_KEYS, *TELEMETRY_KEYS, *MODEL_KEYS]:
        assert re.search(rf"`{key}`", reference), f"README's configuration reference lacks `{key}`"
        if key in POOL_KEYS:
            assert f"LIP_{key.upper()}" in reference, f"README lacks the variable LIP_{key.upper()}"


@pytest.mark.parametrize("url", ["http://admin:hunter2@gpu1:8080", "http://hunter2@gpu1:8080/v1"])
def test_a_backend_url_with_a_password_is_refused_without_showing_it(url: str) -> None:
    with pytest.raises(ConfigError, match="must not carry a user name or password") as refused:
        BackendConfig(url=url)
    assert "hunter2" not in str(refused.value)
    with pytest.raises(ConfigError) as from_env:
        load_config(environ={"LIP_BACKENDS": url})
    assert "hunter2" not in str(from_env.value)
