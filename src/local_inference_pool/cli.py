"""The ``local-inference-pool`` command: serve, check, config, simulate, demo."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

import anyio
import httpx
from rich.console import Console
from rich.table import Table

from local_inference_pool.config import BACKEND_KINDS, PoolConfig, load_config, shown_state
from local_inference_pool.core.scheduler import Health
from local_inference_pool.errors import ConfigError
from local_inference_pool.serve import configure_logging, serve

if TYPE_CHECKING:
    pass

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
    serve.add_argument(
        "--watch",
        action="store_true",
        help="reload the config file when it changes (as SIGHUP does), a swapped symlink included",
    )
    _log_level(serve)

    register = commands.add_parser(
        "register",
        help="keep this machine's server registered with a pool while it runs",
        description=(
            "Register one inference server with a pool through its admin API, renew the registration "
            "every third of --ttl, and on SIGINT/SIGTERM remove it (the pool drains it first). A "
            "server that stops renewing is drained and removed by the pool when its ttl runs out. "
            "Exits 2 when the pool refuses it (a wrong admin key, an invalid entry)."
        ),
    )
    register.add_argument(
        "--pool", required=True, help="the pool's URL as clients use it, like http://gw:8000/v1"
    )
    register.add_argument(
        "--admin-key-env", required=True, metavar="VAR", help="environment variable holding an admin key"
    )
    register.add_argument("--url", required=True, help="this server's URL as the pool reaches it")
    register.add_argument(
        "--ttl",
        type=float,
        default=30.0,
        help="seconds a registration lasts unrenewed (default: %(default)s)",
    )
    register.add_argument("--name", help="the backend's name in the pool (default: host:port of --url)")
    register.add_argument("--kind", choices=list(BACKEND_KINDS), help="the server's kind (default: detected)")
    register.add_argument(
        "--slots", type=int, help="parallel slots (default: detected where the server says)"
    )
    register.add_argument("--models", help="comma-separated models (default: detected)")
    register.add_argument(
        "--api-key-env", metavar="VAR", help="environment variable holding the server's own key"
    )

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
            return serve(
                args.config, args.host, args.port, args.log_level, workers=args.workers, watch=args.watch
            )
        if args.command == "register":
            return register_command(args)
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
    data.pop("holders")  # the keys' hashes again, by holder
    data["keys"] = [key.to_dict() for key in config.keys]  # hashes only: the secrets are not kept
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


def register_command(args: argparse.Namespace) -> int:
    from local_inference_pool.registration import register, registration_from_args

    registration = registration_from_args(
        args.pool,
        args.url,
        args.admin_key_env,
        ttl=args.ttl,
        name=args.name,
        kind=args.kind,
        slots=args.slots,
        models=args.models,
        api_key_env=args.api_key_env,
    )
    return anyio.run(lambda: register(registration, say=lambda line: print(line, flush=True)))


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

    configure_logging("warning")
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


if __name__ == "__main__":
    sys.exit(main())
