"""Read params.yaml (+ `--set section.key=value` overrides) into frozen `stages.config.Params`.

Every entry point shares `make_parser`, so `--params`, `--set` and `--help` behave the same
everywhere.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from stages.config import ConfigError, Params, from_dict


def make_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python -m pipeline.{prog}",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one param (YAML value), repeatable, e.g. --set train.steps=50",
    )
    # read by pipeline.cli before main runs; declared here so argparse accepts it everywhere
    parser.add_argument("--debug", action="store_true", help="print the full traceback of an error (or KDCACHE_DEBUG=1)")
    return parser


def positive_int(text: str) -> int:
    """argparse type of a count option (--workers, --fidelity): an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` inside the nested dict `raw`; the value is parsed as YAML."""
    if "=" not in override:
        raise ConfigError(f"--set {override!r}: expected SECTION.KEY=VALUE")
    key, _, text = override.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {override!r}: empty key")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {override!r}: '{part}' is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(text)


def load_params(path: str | Path = "params.yaml", overrides: list[str] | tuple[str, ...] = ()) -> Params:
    """Params from a YAML file; a missing file means all defaults."""
    path = Path(path)
    raw: dict[str, Any] = {}
    if path.exists():
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from err
    elif str(path) != "params.yaml":
        raise ConfigError(f"{path}: params file not found")
    for override in overrides:
        apply_override(raw, override)
    try:
        return from_dict(Params, raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err


def params_from_args(args: argparse.Namespace) -> Params:
    """Load params for an entry point; config errors exit with a one-line message."""
    try:
        return load_params(args.params, args.overrides)
    except ConfigError as err:
        sys.exit(f"error: {err}")
