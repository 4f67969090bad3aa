"""The ``local-inference-pool`` command: serve, check, config, simulate, demo."""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

import anyio
import httpx
from anyio.abc import TaskStatus
from rich.console import Console
from rich.table import Table

from local_inference_pool.config import PoolConfig, load_config, shown_state
from local_inference_pool.core.scheduler import Health
from local_inference_pool.errors import ConfigError

if TYPE_CHECKING:
    import uvicorn

REDACTED = "***"
CONFIG_HELP = "TOML config file (default: $LIP_CONFIG; LIP_* variables apply on top)"


def _version() -> str:
    try:
        return version("local-inference-pool")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="local-inference-pool",
        description="One slot-aware, OpenAI-compatible endpoint in front of many local LLM servers.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="serve the pool under uvicorn, at /v1",
        description=(
            "Serve the OpenAI-compatible pool under uvicorn, mounted at /v1: point any OpenAI client at "
            "http://HOST:PORT/v1. With --workers N, N processes serve one port and share their slot "
            "accounting through pool.state (Redis). SIGINT/SIGTERM stop it cleanly: queued requests "
            "get 503, in-flight ones may finish within pool.shutdown_grace seconds; a second signal "
            "stops at once."
        ),
    )
    serve.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="serving processes on the one port; more than 1 needs pool.state (default: %(default)s)",
    )
    _log_level(serve)

    check = commands.add_parser(
        "check",
        help="validate the config and probe every backend once",
        description=(
            "Validate the configuration, then probe every backend once (detecting its kind when it is "
            "'auto') and print a table: kind, health, models, loaded models, slots. Exits 2 when the "
            "configuration is invalid and 1 when no backend is reachable. Run it before 'serve'."
        ),
    )
    check.add_argument("--config", metavar="PATH", help=CONFIG_HELP)

    config = commands.add_parser(
        "config",
        help="print the effective configuration",
        description=(
            "Load the config file with LIP_* and LOCAL_INFERENCE_SERVER_<N> environment variables applied, "
            "exactly as the pool will, and print the result as JSON with secrets redacted. Exits 2 with "
            "one line naming the field when the configuration is invalid."
        ),
    )
    config.add_argument("--config", metavar="PATH", help=CONFIG_HELP)

    simulate = commands.add_parser(
        "simulate",
        help="run one simulated llama.cpp backend",
        description=(
            "Run one simulated llama.cpp server (no model, no GPU): /health, /props, /slots, /v1/models "
            "and OpenAI chat/completions/embeddings, streaming at a set token rate, with N slots and "
            "requests beyond them queued inside it."
        ),
    )
    simulate.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    simulate.add_argument("--port", type=int, default=8080, help="port to listen on (default: %(default)s)")
    simulate.add_argument(
        "--models", default="sim-model", help="comma-separated model names (default: %(default)s)"
    )
    simulate.add_argument("--slots", type=int, default=2, help="parallel slots (default: %(default)s)")
    simulate.add_argument(
        "--tokens-per-second", type=float, default=50.0, help="generation speed (default: %(default)s)"
    )
    simulate.add_argument(
        "--load-seconds", type=float, default=0.0, help="time to switch models (default: %(default)s)"
    )
    _log_level(simulate, default="warning")

    demo = commands.add_parser(
        "demo",
        help="run the pool on simulated backends with a sample workload",
        description=(
            "Start four simulated backends with different models and slot counts, the pool in front of "
            "them, print the API, dashboard and metrics URLs, drive a sample workload of mixed models and "
            "chat sessions with a live progress line, then keep serving until Ctrl-C. Needs no GPU, no "
            "model and no network."
        ),
    )
    demo.add_argument(
        "--port", type=int, default=8000, help="pool port, 0 for any free one (default: %(default)s)"
    )
    demo.add_argument("--duration", type=float, help="stop by itself after this many seconds")
    demo.add_argument(
        "--requests", type=int, default=120, help="requests in the sample workload (default: %(default)s)"
    )
    return parser


def _log_level(parser: argparse.ArgumentParser, default: str = "info") -> None:
    parser.add_argument(
        "--log-level",
        default=default,
        choices=["critical", "error", "warning", "info", "debug"],
        help="log level (default: %(default)s)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "config":
            print(json.dumps(effective_config(args.config), indent=2))
            return 0
        if args.command == "check":
            return anyio.run(check, load_config(args.config), Console())
        if args.command == "serve":
            return serve(args.config, args.host, args.port, args.log_level, workers=args.workers)
        if args.command == "simulate":
            return simulate(args)
        if args.command == "demo":
            return demo(args)
    except ConfigError as exc:
        print(f"local-inference-pool: invalid configuration: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 2


def effective_config(path: str | None) -> dict[str, Any]:
    config = load_config(path)
    data = asdict(config)
    data["api_keys"] = [REDACTED for _ in config.api_keys]
    data["admin_keys"] = [REDACTED for _ in config.admin_keys]
    data["state"] = shown_state(config.state)
    for backend in data["backends"]:
        if backend["api_key"] is not None:
            backend["api_key"] = REDACTED
    for key in data["keys"]:
        key["key"] = REDACTED  # read from key_env or given: a secret either way
    return data


async def check(config: PoolConfig, console: Console) -> int:
    """Probe every backend once, concurrently; 0 when at least one is reachable."""
    from local_inference_pool.upstream.health import probe_once

    if not config.backends:
        raise ConfigError("no backends: add [[backends]] to the config file or set LIP_BACKENDS")
    results: dict[str, Any] = {}
    async with httpx.AsyncClient(trust_env=False) as client, anyio.create_task_group() as group:

        async def one(backend: Any) -> None:
            kind = None if backend.kind == "auto" else backend.kind
            results[backend.name] = await probe_once(client, backend, kind, config.health_timeout)

        for backend in config.backends:
            group.start_soon(one, backend)
    table = Table(title="backends")
    for column in ("name", "url", "kind", "health", "slots", "models", "loaded", "error"):
        table.add_column(column, overflow="fold")
    reachable = 0
    for backend in config.backends:
        kind, snapshot = results[backend.name]
        reachable += snapshot.health is not Health.UNHEALTHY
        slots = backend.slots or snapshot.slots
        table.add_row(
            backend.name,
            backend.url,
            kind or "?",
            snapshot.health.value,
            f"{slots}"
            + ("" if backend.slots else " (detected)" if snapshot.slots else " (unknown: counts 1)"),
            ", ".join(backend.models or snapshot.models or []) or "-",
            ", ".join(snapshot.resident or []) or "-",
            snapshot.error or "",
        )
    console.print(table)
    if not reachable:
        console.print("no backend is reachable", style="bold red")
        return 1
    console.print(f"{reachable} of {len(config.backends)} backends reachable")
    return 0


def serve(path: str | None, host: str, port: int, log_level: str, *, workers: int = 1) -> int:
    config = load_config(path)
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
    _configure_logging(log_level)
    if workers == 1:
        return _serve_process(config, host, port, log_level, sockets=None, name="the pool")
    return _serve_workers(path, host, port, log_level, workers)


def _serve_process(
    config: PoolConfig,
    host: str,
    port: int,
    log_level: str,
    *,
    sockets: list[Any] | None,
    name: str,
    parent: int | None = None,
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
    app = create_standalone_app(config)
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

    try:
        anyio.run(
            _serve_until_stopped,
            server,
            running,
            config.shutdown_grace,
            f"{name} on {host}:{port}",
            sockets,
            parent,
        )
    except (OSError, SystemExit) as exc:  # the port is taken, or the address is not ours
        if isinstance(exc, SystemExit) and not exc.code:
            return 0
        print(f"local-inference-pool: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 1
    return 0


def _serve_workers(path: str | None, host: str, port: int, log_level: str, workers: int) -> int:
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
        spawn.Process(target=_worker, args=(path, host, port, log_level, sock, index + 1, workers))
        for index in range(workers)
    ]
    for child in children:
        child.start()
    sock.close()

    def pass_on(number: int, _frame: object) -> None:
        for child in children:
            if child.pid is not None and child.is_alive():
                os.kill(child.pid, number)

    previous = {number: signal.signal(number, pass_on) for number in (signal.SIGINT, signal.SIGTERM)}
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
    path: str | None, host: str, port: int, log_level: str, sock: Any, index: int, workers: int
) -> None:
    # Out of the terminal's process group: the parent passes each signal on, once.
    os.setpgrp()
    _configure_logging(log_level)
    parent = multiprocessing.parent_process()
    code = _serve_process(
        load_config(path),
        host,
        port,
        log_level,
        sockets=[sock],
        name=f"worker {index}/{workers}",
        parent=None if parent is None else parent.sentinel,
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
) -> None:
    """Serve until SIGINT or SIGTERM (to the process or its whole group, as a terminal's Ctrl-C):
    one line says what stops and how much is still running, which gets ``grace`` seconds; a second
    signal stops the process at once, also with one line and no traceback. ``parent``: the parent's
    sentinel (a worker's): readable once the parent is gone, which stops this process as SIGTERM
    would."""
    stopping: list[str] = []

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
        if parent is not None:
            group.start_soon(on_orphaned, parent)
        await server.serve(sockets=sockets)
        group.cancel_scope.cancel()


def _requests(count: int) -> str:
    return f"{count} request{'' if count == 1 else 's'}"


def simulate(args: argparse.Namespace) -> int:
    import uvicorn

    from local_inference_pool.sim.simulator import SimulatedBackend, SimulatorConfig

    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    if not models or args.slots < 1 or args.tokens_per_second <= 0 or args.load_seconds < 0:
        print(
            "local-inference-pool: simulate needs models, --slots >= 1, --tokens-per-second > 0 and --load-seconds >= 0",
            file=sys.stderr,
        )
        return 2
    backend = SimulatedBackend(
        SimulatorConfig(
            models=models,
            slots=args.slots,
            tokens_per_second=args.tokens_per_second,
            load_seconds=args.load_seconds,
        )
    )
    print(
        f"simulated llama.cpp server at http://{args.host}:{args.port} (models {', '.join(models)}, {args.slots} slots)"
    )
    uvicorn.run(backend, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def demo(args: argparse.Namespace) -> int:
    from local_inference_pool.sim.demo import run_demo

    _configure_logging("warning")
    console = Console()
    status = anyio.run(
        lambda: run_demo(
            port=args.port,
            duration=args.duration,
            requests=args.requests,
            console=console,
            stop_on_signals=True,
        )
    )
    traffic = status["traffic"]
    by = f" by {status['stopped_by']}" if status["stopped_by"] else ""
    console.print(
        f"demo stopped{by}: {traffic['requests']} requests done, {status['active_leases']} still running, "
        f"{traffic['completion_tokens']} tokens, {sum(b['model_loads'] for b in status['backends'])} model loads"
    )
    routes = traffic.get("by_route", {})
    if routes:
        shown = ", ".join(
            f"{route} {counts['requests']} ({counts['errors']} errors)" for route, counts in routes.items()
        )
        console.print(f"  by API: {shown}")
    cache = status.get("prompt_cache", [])
    prompt = sum(c["prompt_tokens"] for c in cache)
    if prompt:
        cached = sum(c["cached_tokens"] for c in cache)
        waits = sum(c["waits"] for c in cache)
        moved = sum(c["moved"] for c in cache)
        console.print(
            f"  prompt cache: {cached / prompt:.0%} of {prompt} prompt tokens served from the servers' "
            f"caches; {waits} requests waited for theirs, {moved} moved"
        )
    return 0


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every request at INFO: a line per health probe. The pool logs what matters of them.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLevelName(level.upper())))


if __name__ == "__main__":
    sys.exit(main())
