"""``local-inference-pool serve``: the pool under uvicorn, in one process or several on one port.

Signals: SIGINT and SIGTERM stop it cleanly (a second one at once), SIGHUP reloads the config file,
as a change of the file does with ``--watch``. With ``--workers N``, this process binds the socket,
starts N workers in process groups of their own and passes each signal on once.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskStatus

from local_inference_pool.config import ConfigSource, PoolConfig
from local_inference_pool.errors import ConfigError
from local_inference_pool.gateway.changes import ChangeRefused

if TYPE_CHECKING:
    import uvicorn

__all__ = ["configure_logging", "serve"]


def serve(
    path: str | None, host: str, port: int, log_level: str, *, workers: int = 1, watch: bool = False
) -> int:
    source = ConfigSource.at(path)
    if watch and source.path is None:
        raise ConfigError("--watch: there is no config file to watch; give --config or set LIP_CONFIG")
    config = source.load()
    if not config.backends:
        raise ConfigError("no backends: add [[backends]] to the config file or set LIP_BACKENDS")
    if workers < 1:
        raise ConfigError(f"--workers: {workers} is not allowed; expected 1 or more")
    if workers > 1 and config.state is None:
        raise ConfigError(
            f"--workers {workers}: each process would count every slot as its own and together they "
            'would oversubscribe the backends; set pool.state = "redis://host:6379/0" in the config '
            "(or LIP_STATE) so that the processes share their leases, or serve with one worker"
        )
    configure_logging(log_level)
    if workers == 1:
        return _serve_process(
            source, config, host, port, log_level, sockets=None, name="the pool", watch=watch
        )
    return _serve_workers(source, host, port, log_level, workers, watch)


def _serve_process(
    source: ConfigSource,
    config: PoolConfig,
    host: str,
    port: int,
    log_level: str,
    *,
    sockets: list[Any] | None,
    name: str,
    parent: int | None = None,
    watch: bool = False,
) -> int:
    """One serving process: uvicorn without its own signal handling, ours instead (one line, no
    traceback); on ``sockets`` when a parent bound them for its workers."""
    import uvicorn

    from local_inference_pool.gateway.app import create_standalone_app
    from local_inference_pool.gateway.server_limits import (
        CancelledAtShutdownFilter,
        ClientLeftFilter,
        bounded_protocol,
    )
    from local_inference_pool.gateway.serving import InProcessServer

    for quieter in (ClientLeftFilter(), CancelledAtShutdownFilter()):
        logging.getLogger("uvicorn.error").addFilter(quieter)
    app = create_standalone_app(config, source=source)
    server = InProcessServer(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level=log_level,
            timeout_graceful_shutdown=max(1, round(config.shutdown_grace)),
            # asyncio's own loop even where uvloop is installed: measured with wrk at 128 connections
            # opened back to back, uvloop left 1% of requests waiting over a second, for 3% more req/s.
            loop="asyncio",
            http=bounded_protocol(config),  # head size, field count and time bounded (server_limits.py)
        )
    )

    def running() -> int:
        runtime = app.pool_app.state.runtime
        return 0 if runtime is None else int(runtime.pool.snapshot()["active_leases"])

    async def reload(why: str) -> None:
        changes = app.pool_app.state.changes
        if changes is None:
            return
        with contextlib.suppress(ChangeRefused):  # said in the log; the old configuration serves on
            await changes.reload(who=why)

    try:
        anyio.run(
            _serve_until_stopped,
            server,
            running,
            config.shutdown_grace,
            f"{name} on {host}:{port}",
            sockets,
            parent,
            reload,
            source.path if watch else None,
        )
    except (OSError, SystemExit) as exc:  # the port is taken, or the address is not ours
        if isinstance(exc, SystemExit) and not exc.code:
            return 0
        print(f"local-inference-pool: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 1
    return 0


def _serve_workers(
    source: ConfigSource, host: str, port: int, log_level: str, workers: int, watch: bool
) -> int:
    """``workers`` processes on one socket bound here, as uvicorn's own workers do; the kernel
    spreads connections over them and the shared state spreads the slots.

    Each worker runs in a process group of its own, so a signal reaches it once, from here: a
    terminal's Ctrl-C goes to this process's group only, and this process passes every SIGINT and
    SIGTERM on. (In one group, the terminal's signal and the one passed on would reach a worker as
    two, and the second means "stop at once".) A worker whose parent dies stops as if told to."""
    import uvicorn

    try:
        sock = uvicorn.Config(app=_no_app, host=host, port=port).bind_socket()
    except SystemExit:
        return 1  # uvicorn said why (the port is taken, or the address is not ours)
    spawn = multiprocessing.get_context("spawn")
    children = [
        spawn.Process(target=_worker, args=(source, host, port, log_level, sock, index + 1, workers, watch))
        for index in range(workers)
    ]
    for child in children:
        child.start()
    sock.close()

    def pass_on(number: int, _frame: object) -> None:
        for child in children:
            if child.pid is not None and child.is_alive():
                os.kill(child.pid, number)

    passed = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # SIGHUP: each worker reloads
    previous = {number: signal.signal(number, pass_on) for number in passed}
    try:
        for child in children:
            child.join()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    codes = [child.exitcode for child in children]
    print(f"local-inference-pool: {workers} workers stopped (exit codes {codes})", flush=True)
    if all(code == 0 for code in codes):
        return 0
    return 130 if all(code in (0, 130) for code in codes) else 1  # 130: some were stopped at once


def _worker(
    source: ConfigSource,
    host: str,
    port: int,
    log_level: str,
    sock: Any,
    index: int,
    workers: int,
    watch: bool,
) -> None:
    # Out of the terminal's process group: the parent passes each signal on, once.
    os.setpgrp()
    configure_logging(log_level)
    parent = multiprocessing.parent_process()
    code = _serve_process(
        source,
        source.load(),
        host,
        port,
        log_level,
        sockets=[sock],
        name=f"worker {index}/{workers}",
        parent=None if parent is None else parent.sentinel,
        watch=watch,
    )
    sys.exit(code)


async def _no_app(scope: Any, receive: Any, send: Any) -> None:
    """uvicorn's Config needs an app to bind a socket; the workers bring their own."""


async def _serve_until_stopped(
    server: uvicorn.Server,
    running: Callable[[], int],
    grace: float,
    where: str,
    sockets: list[Any] | None = None,
    parent: int | None = None,
    reload: Callable[[str], Awaitable[None]] | None = None,
    watched: str | None = None,
) -> None:
    """Serve until SIGINT or SIGTERM (to the process or its whole group, as a terminal's Ctrl-C):
    one line says what stops and how much is still running, which gets ``grace`` seconds; a second
    signal stops the process at once, also with one line and no traceback. ``parent``: the parent's
    sentinel (a worker's): readable once the parent is gone, which stops this process as SIGTERM
    would. SIGHUP, and with ``watched`` a change of that file, call ``reload``."""
    stopping: list[str] = []

    async def on_reloads(*, task_status: TaskStatus[None]) -> None:
        with anyio.open_signal_receiver(signal.SIGHUP) as signals:
            task_status.started()
            async for _ in signals:
                if reload is not None:
                    await reload("SIGHUP")

    async def on_changes() -> None:
        from local_inference_pool.config_watch import config_changes

        assert watched is not None
        assert reload is not None
        async for _ in config_changes(watched):
            await reload("the config file changed")

    async def on_orphaned(sentinel: int) -> None:
        await anyio.wait_readable(sentinel)
        if not stopping:
            stopping.append("parent gone")
            print(f"the parent process is gone: stopping {where}", flush=True)
            server.should_exit = True

    async def on_signals(*, task_status: TaskStatus[None]) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            async for number in signals:
                name = signal.Signals(number).name
                count = running()
                if stopping:
                    print(f"{name} again: stopped at once, {_requests(count)} cut off", flush=True)
                    os._exit(130)  # asked twice: no more waiting for anything
                stopping.append(name)
                print(
                    f"{name}: stopping {where}; {_requests(count)} still running "
                    f"get up to {grace:g} s (press Ctrl-C again to stop at once)",
                    flush=True,
                )
                server.should_exit = True

    async with anyio.create_task_group() as group:
        await group.start(on_signals)
        await group.start(on_reloads)
        if watched is not None:
            group.start_soon(on_changes)
        if parent is not None:
            group.start_soon(on_orphaned, parent)
        await server.serve(sockets=sockets)
        group.cancel_scope.cancel()


def _requests(count: int) -> str:
    return f"{count} request{'' if count == 1 else 's'}"


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every request at INFO: a line per health probe. The pool logs what matters of them.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLevelName(level.upper())))
