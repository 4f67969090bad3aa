"""The ``local-inference-pool`` command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from local_inference_pool.config import load_config
from local_inference_pool.errors import ConfigError

REDACTED = "***"


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
    config = commands.add_parser(
        "config",
        help="validate a configuration and print the effective settings",
        description=(
            "Load the config file (or $LIP_CONFIG) with LIP_* and LOCAL_INFERENCE_SERVER_<N> environment "
            "variables applied, exactly as the pool will, and print the result as JSON with secrets "
            "redacted. Exits 2 with one line naming the field when the configuration is invalid."
        ),
    )
    config.add_argument("--config", metavar="PATH", help="TOML config file (default: $LIP_CONFIG, else none)")
    serve = commands.add_parser(
        "serve",
        help="serve the pool under uvicorn, at /v1",
        description=(
            "Serve the OpenAI-compatible pool under uvicorn, mounted at /v1: point any OpenAI client at "
            "http://HOST:PORT/v1. One process owns the slot accounting, so there is no worker count. "
            "SIGINT/SIGTERM stop it cleanly: queued requests get 503, in-flight ones may finish within "
            "pool.shutdown_grace seconds."
        ),
    )
    serve.add_argument("--config", metavar="PATH", help="TOML config file (default: $LIP_CONFIG, else none)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    serve.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="log level (default: %(default)s)",
    )
    return parser


def effective_config(path: str | None) -> dict[str, Any]:
    config = load_config(path)
    data = asdict(config)
    data["api_keys"] = [REDACTED for _ in config.api_keys]
    for backend in data["backends"]:
        if backend["api_key"] is not None:
            backend["api_key"] = REDACTED
    return data


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "config":
            print(json.dumps(effective_config(args.config), indent=2))
        elif args.command == "serve":
            return serve(args.config, args.host, args.port, args.log_level)
    except ConfigError as exc:
        print(f"local-inference-pool: invalid configuration: {exc}", file=sys.stderr)
        return 2
    return 0


def serve(path: str | None, host: str, port: int, log_level: str) -> int:
    import uvicorn

    from local_inference_pool.app import create_standalone_app

    config = load_config(path)
    if not config.backends:
        raise ConfigError("no backends: add [[backends]] to the config file or set LIP_BACKENDS")
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        uvicorn.run(
            create_standalone_app(config),
            host=host,
            port=port,
            log_level=log_level,
            timeout_graceful_shutdown=max(1, round(config.shutdown_grace)),
        )
    except OSError as exc:  # the port is taken, or the address is not ours
        print(f"local-inference-pool: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
