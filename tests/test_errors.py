from __future__ import annotations

import pytest

from local_inference_pool import errors


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (errors.ModelNotFoundError("no such model", model="m"), 404, "model_not_found"),
        (errors.QueueFullError("full"), 429, "queue_full"),
        (errors.NoCapacityError("down", model="m"), 503, "no_backend_available"),
        (errors.QueueTimeoutError("slow", model="m", waited=1.0), 503, "queue_timeout"),
        (errors.PoolClosedError("closing"), 503, "pool_closed"),
    ],
)
def test_each_error_knows_its_status_and_openai_body(error: errors.PoolError, status: int, code: str) -> None:
    assert error.status == status
    assert error.to_openai() == {
        "error": {"message": error.message, "type": error.error_type, "param": None, "code": code}
    }


def test_retryable_errors_say_when_to_retry() -> None:
    assert errors.QueueFullError("x").retry_after is not None
    assert errors.NoCapacityError("x", model="m").retry_after is not None
    assert errors.ModelNotFoundError("x", model="m").retry_after is None


def test_errors_are_also_the_builtin_kinds_callers_catch() -> None:
    assert isinstance(errors.QueueTimeoutError("x", model="m", waited=0), TimeoutError)
    assert isinstance(errors.ConfigError("x"), ValueError)
    assert isinstance(errors.WrongEventLoopError("x"), RuntimeError)


def test_docstring_tree_lists_every_error() -> None:
    doc = errors.__doc__ or ""
    for name, value in vars(errors).items():
        if isinstance(value, type) and issubclass(value, errors.PoolError):
            assert name in doc
