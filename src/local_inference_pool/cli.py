"""The ``local-inference-pool`` command."""

from __future__ import annotations

import argparse
import json
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
    if args.command == "config":
        try:
            data = effective_config(args.config)
        except ConfigError as exc:
            print(f"local-inference-pool: invalid configuration: {exc}", file=sys.stderr)
            return 2
        print(json.dumps(data, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
