"""``[[keys]]`` entries: only the hash of a secret is kept, limits are checked, expiry is read."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path
from typing import Any

import pytest

from local_inference_pool.cli import main
from local_inference_pool.config import PoolConfig
from local_inference_pool.errors import ConfigError
from local_inference_pool.key_config import KeyConfig, key_from_dict, key_with


def test_only_the_hash_of_a_secret_is_kept_however_it_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    digest = hashlib.sha256(b"sk-team").hexdigest()
    monkeypatch.setenv("TEAM_KEY", "sk-team")
    given = [
        KeyConfig(name="a", key="sk-team"),
        KeyConfig(name="b", key_env="TEAM_KEY"),
        KeyConfig(name="c", key_sha256=digest.upper()),
    ]
    assert {key.key_sha256 for key in given} == {digest}
    assert all(key.key is None and "sk-team" not in repr(key) for key in given)
    config = PoolConfig(keys=(given[0],), api_keys=("sk-plain",))
    assert config.holders == {digest: "a", hashlib.sha256(b"sk-plain").hexdigest(): "api_keys[0]"}


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"name": "t", "key": "k", "rpm": -1}, "keys['t'].rpm: -1 is not allowed"),
        ({"name": "t", "key": "k", "tpm": "lots"}, "keys['t'].tpm: 'lots' is not allowed"),
        ({"name": "t", "key": "k", "budget_period": "year"}, "day, week, month, or seconds"),
        ({"name": "t", "key": "k", "expires": "soon"}, "expected a date like 2027-01-31"),
        ({"name": "t", "key": "k", "models": "qwen"}, "keys['t'].models"),
        ({"name": "t", "key_sha256": "abc"}, "64 hex digits"),
        ({"name": "t", "key": "k", "key_sha256": "a" * 64}, "exactly one of"),
        ({"name": "t", "key": "k", "limit": 5}, "unknown key 'limit'"),
    ],
)
def test_a_malformed_entry_is_refused_naming_the_field(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        key_from_dict(entry, "keys[0]")
    assert message in str(refused.value)
    assert "\n" not in str(refused.value)


def test_a_malformed_limit_in_the_file_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "pool.toml"
    path.write_text('[[keys]]\nname = "team"\nkey = "sk-team"\nrpm = 1.5\n')
    assert main(["config", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "keys['team'].rpm: 1.5 is not allowed" in err
    assert "sk-team" not in err


def test_expiry_a_date_is_the_whole_day_and_a_time_is_utc() -> None:
    day = key_from_dict({"name": "d", "key": "k", "expires": dt.date(2027, 1, 31)}, "d")
    text = key_from_dict({"name": "t", "key": "k", "expires": "2027-01-31T12:00:00+02:00"}, "t")
    naive = KeyConfig(name="n", key="k", expires=dt.datetime(2027, 1, 31, 12))
    end_of_day = dt.datetime(2027, 2, 1, tzinfo=dt.UTC).timestamp()
    assert not day.expired(end_of_day - 1)
    assert day.expired(end_of_day)
    assert text.expires == dt.datetime(2027, 1, 31, 10, tzinfo=dt.UTC)
    assert naive.expires == dt.datetime(2027, 1, 31, 12, tzinfo=dt.UTC)


def test_models_take_names_and_glob_patterns() -> None:
    key = key_from_dict({"name": "t", "key": "k", "models": ["qwen*", "llama-3.1-8b"]}, "t")
    assert key.allows("qwen2.5:7b")
    assert key.allows("llama-3.1-8b")
    assert not key.allows("llama-3.1-70b")
    assert KeyConfig(name="any", key="k").allows("whatever")


def test_a_change_keeps_the_hash_and_round_trips_through_json() -> None:
    key = key_from_dict({"name": "t", "key": "sk-t", "rpm": 5, "expires": "2027-01-31"}, "t")
    changed = key_with(key, {"rpm": 9, "disabled": True}, "key")
    assert (changed.rpm, changed.disabled, changed.key_sha256) == (9, True, key.key_sha256)
    assert key_from_dict(changed.to_dict(), "again") == changed
    with pytest.raises(ConfigError, match="may not be changed"):
        key_with(key, {"name": "other"}, "key")


def test_an_admin_key_may_not_be_a_user_key_even_by_its_hash() -> None:
    digest = hashlib.sha256(b"sk-admin").hexdigest()
    with pytest.raises(ConfigError, match="an admin key is also a user key"):
        PoolConfig(keys=(KeyConfig(name="t", key_sha256=digest),), admin_keys=("sk-admin",))
