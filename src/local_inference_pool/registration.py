"""``local-inference-pool register``: keep one server registered with a pool while it runs.

Run next to an inference server: it registers the server through the pool's admin API with a TTL,
renews the registration every third of it (a heartbeat), and on SIGINT or SIGTERM removes it (the
pool drains it first). A machine that boots joins the fleet; one that sleeps or dies stops renewing,
and the pool drains and removes it when the TTL runs out. A pool that cannot be reached is tried
again with backoff, so the gateway may restart meanwhile.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import httpx

from local_inference_pool.config import BackendConfig, backend_from_dict
from local_inference_pool.errors import ConfigError

__all__ = ["Registration", "register"]

logger = logging.getLogger(__name__)

MAX_BACKOFF = 30.0


@dataclass(frozen=True)
class Registration:
    """What to register: the pool's mount URL (``http://gateway:8000/v1``), the admin key, and the
    backend's entry (the keys of a ``[[backends]]`` table)."""

    pool: str
    admin_key: str
    entry: dict[str, Any]
    ttl: float = 30.0

    @property
    def backend(self) -> BackendConfig:
        """The entry as the pool will see it (its name, when none is given, made from the URL)."""
        return backend_from_dict(self.entry, "backend")

    @property
    def endpoint(self) -> str:
        return self.pool.rstrip("/") + "/pool/admin/backends"


class Refused(Exception):
    """The pool refused the registration for good (a wrong key, an invalid entry)."""


async def register(
    registration: Registration,
    *,
    say: Callable[[str], None] = print,
    transport: httpx.AsyncBaseTransport | None = None,
) -> int:
    """Register, renew until SIGINT or SIGTERM, then remove; 0 when it left cleanly, 2 when the pool
    refused it (a wrong admin key, an invalid entry, a URL that a configured backend has)."""
    backend = registration.backend  # raises ConfigError before anything is sent
    headers = {"authorization": f"Bearer {registration.admin_key}"}
    async with (
        httpx.AsyncClient(transport=transport, headers=headers, timeout=10.0, trust_env=False) as client,
        anyio.create_task_group() as group,
    ):
        stopped = anyio.Event()

        async def on_signals() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for number in signals:
                    say(f"{signal.Signals(number).name}: leaving the pool")
                    stopped.set()
                    return

        group.start_soon(on_signals)
        try:
            await _renew_until(client, registration, backend, stopped, say)
        except Refused as refused:
            say(f"the pool refused {backend.name}: {refused}")
            return 2
        finally:
            group.cancel_scope.cancel()
        with anyio.move_on_after(registration.ttl, shield=True):
            await _leave(client, registration, backend, say)
    return 0


async def _renew_until(
    client: httpx.AsyncClient,
    registration: Registration,
    backend: BackendConfig,
    stopped: anyio.Event,
    say: Callable[[str], None],
) -> None:
    body = json.dumps({**registration.entry, "ttl": registration.ttl})
    backoff, joined = 1.0, False
    while not stopped.is_set():
        try:
            answer = await client.post(
                registration.endpoint, content=body, headers={"content-type": "application/json"}
            )
        except httpx.HTTPError as exc:
            say(f"the pool at {registration.pool} cannot be reached ({type(exc).__name__}); trying again")
            joined = False
            wait, backoff = backoff, min(MAX_BACKOFF, backoff * 2)
        else:
            if answer.status_code in (400, 401, 403, 404, 409, 413):
                raise Refused(_message(answer))
            if answer.status_code >= 300:
                say(f"the pool answered {answer.status_code}: {_message(answer)}; trying again")
                joined = False
                wait, backoff = backoff, min(MAX_BACKOFF, backoff * 2)
            else:
                if not joined:
                    say(
                        f"registered {backend.name} ({backend.url}) with {registration.pool}, "
                        f"renewed every {registration.ttl / 3:g}s"
                    )
                joined, backoff = True, 1.0
                wait = registration.ttl / 3
        with anyio.move_on_after(wait):
            await stopped.wait()


async def _leave(
    client: httpx.AsyncClient, registration: Registration, backend: BackendConfig, say: Callable[[str], None]
) -> None:
    try:
        answer = await client.delete(f"{registration.endpoint}/{backend.name}")
    except httpx.HTTPError as exc:
        say(f"could not tell the pool ({type(exc).__name__}): it removes {backend.name} at its ttl")
        return
    if answer.status_code == 200:
        say(f"{backend.name} drained and removed from the pool")
    else:
        say(f"the pool answered {answer.status_code} to the removal: {_message(answer)}")


def _message(answer: httpx.Response) -> str:
    try:
        return str(answer.json()["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return answer.text[:300]


def registration_from_args(
    pool: str,
    url: str,
    admin_key_env: str,
    *,
    ttl: float,
    name: str | None = None,
    kind: str | None = None,
    slots: int | None = None,
    models: str | None = None,
    api_key_env: str | None = None,
    environ: dict[str, str] | None = None,
) -> Registration:
    """A registration from the command's arguments; ConfigError names what is wrong."""
    env = dict(os.environ) if environ is None else environ
    admin_key = env.get(admin_key_env, "")
    if not admin_key:
        raise ConfigError(f"--admin-key-env: the environment variable {admin_key_env!r} is not set")
    if not 1 <= ttl <= 86_400:
        raise ConfigError(f"--ttl: {ttl:g} is not allowed; expected seconds from 1 to 86400")
    entry: dict[str, Any] = {"url": url}
    if name:
        entry["name"] = name
    if kind:
        entry["kind"] = kind
    if slots is not None:
        entry["slots"] = slots
    if models:
        entry["models"] = [m.strip() for m in models.split(",") if m.strip()]
    if api_key_env:
        key = env.get(api_key_env, "")
        if not key:
            raise ConfigError(f"--api-key-env: the environment variable {api_key_env!r} is not set")
        entry["api_key"] = key
    registration = Registration(pool=pool, admin_key=admin_key, entry=entry, ttl=ttl)
    registration.backend  # noqa: B018 - validates the entry as the pool will
    return registration
