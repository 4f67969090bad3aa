"""A real redis-server for tests: started on a free loopback port with persistence off, stopped after."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass

import pytest
import redis

__all__ = ["Store", "free_port"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Store:
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        server = shutil.which("redis-server")
        if server is None:
            pytest.fail("redis-server is missing: apt-get install redis-server (.ci/run does)")
        self.process = subprocess.Popen(
            [server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if self.process.poll() is not None:
                    pytest.fail(f"redis-server exited with {self.process.returncode}")
                time.sleep(0.05)
        pytest.fail("redis-server did not answer PING within 5 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def leases(self, backend: str = "a") -> int:
        return int(redis.Redis(port=self.port).zcard(f"{{lip}}:{backend}:leases"))

    def models(self, backend: str = "a") -> dict[str, int]:
        raw: dict[bytes, bytes] = redis.Redis(port=self.port).hgetall(f"{{lip}}:{backend}:models")  # type: ignore[assignment]
        return {k.decode(): int(v) for k, v in raw.items()}

    def queue(self, model: str) -> dict[str, int]:
        """The fleet's queue for ``model``: each process's head, as how many wait there."""
        raw: dict[bytes, bytes] = redis.Redis(port=self.port).hgetall(f"{{lip}}:queue:{model}")  # type: ignore[assignment]
        return {k.decode(): int(v.split()[3]) for k, v in raw.items()}

    def key_leases(self, key: str) -> int:
        """How many unexpired leases the store holds for a client key."""
        client = redis.Redis(port=self.port)
        seconds, micros = client.time()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        return int(client.zcount(f"{{lip}}:key:{key}", now_ms + 1, "+inf"))

    def subscriptions(self) -> list[int]:
        """The age in seconds of each subscribed connection (a subscription that broke and came back
        is young again)."""
        listed = redis.Redis(port=self.port).client_list(_type="pubsub")
        return [int(client["age"]) for client in listed]
