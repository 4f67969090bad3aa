"""Who sent a request and with what priority (``inbound.py``)."""

from __future__ import annotations

import base64

from local_inference_pool.config import KeyConfig, PoolConfig
from local_inference_pool.gateway.inbound import key_holder, key_priority


def config() -> PoolConfig:
    return PoolConfig(
        api_keys=("sk-plain",),
        keys=(KeyConfig(name="batch", key="sk-batch", priority=-5, max_priority=1),),
    )


def test_the_key_names_its_holder_and_a_wrong_key_none() -> None:
    settings = config()
    assert key_holder("Bearer sk-batch", settings) == "batch"
    assert key_holder("Bearer sk-plain", settings) == "api_keys[0]"  # the simple form, by position
    assert key_holder("Bearer sk-nope", settings) is None
    assert key_holder("", settings) is None
    assert key_holder("Basic " + base64.b64encode(b"x:sk-batch").decode(), settings) is None
    assert key_holder("Basic " + base64.b64encode(b"x:sk-batch").decode(), settings, browser=True) == "batch"
    assert key_holder("", PoolConfig()) == ""  # an open pool: everybody is one anonymous tenant


def test_a_keys_priority_is_its_default_and_never_above_its_cap() -> None:
    settings = config()
    assert key_priority(None, settings, "batch") == -5
    assert key_priority(50, settings, "batch") == 1  # lowered to max_priority, not refused
    assert key_priority(-20, settings, "batch") == -20
    assert key_priority(50, settings, "api_keys[0]") == 50  # the pool's max_priority: 100
    assert key_priority(None, settings, "api_keys[0]") == 0


def test_a_plain_key_or_none_is_capped_by_the_pools_max_priority() -> None:
    capped = PoolConfig(api_keys=("sk-plain",), max_priority=3)
    assert key_priority(50, capped, "api_keys[0]") == 3
    assert key_priority(-7, capped, "api_keys[0]") == -7
    assert key_priority(99, PoolConfig(max_priority=0), "") == 0  # an open pool's clients too


def test_a_key_from_the_environment(monkeypatch: object) -> None:
    import pytest

    mp = monkeypatch
    assert isinstance(mp, pytest.MonkeyPatch)
    mp.setenv("TEAM_KEY", "sk-from-env")
    settings = PoolConfig.from_dict({"keys": [{"name": "team", "key_env": "TEAM_KEY", "weight": 2}]})
    assert key_holder("Bearer sk-from-env", settings) == "team"
    assert "sk-from-env" not in repr(settings)
    mp.delenv("TEAM_KEY")
    from local_inference_pool.errors import ConfigError

    with pytest.raises(ConfigError, match="TEAM_KEY"):
        PoolConfig.from_dict({"keys": [{"name": "team", "key_env": "TEAM_KEY"}]})
