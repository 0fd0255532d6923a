"""Read params.yaml (+ `--set section.key=value` overrides) into frozen `stages.config.Params`.

Every entry point shares `make_parser`, so `--params`, `--set` and `--help` behave the same
everywhere.

The YAML is read by `ParamsLoader` (PyYAML's safe loader, no object tags) with three guards, all
checked on the composed node graph before a single value is built, so a hostile file costs
milliseconds, not memory:
* aliases may not expand past `MAX_EXPANDED_NODES` values (a "billion laughs" bomb is a few
  hundred bytes of anchors that expand to 10^8 leaves once anything walks it);
* a key given twice in one mapping is refused (YAML 1.1 loaders keep the last one silently, so a
  second `train:` section would replace the first);
* `1e-3` is a number, as in YAML 1.2 (and dvc's own parser): YAML 1.1 reads it as a string.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from stages.config import ConfigError, Params, from_dict

# far above any real params file (the demo's has ~300 values), far below what hurts
MAX_EXPANDED_NODES = 100_000


class ParamsLoader(yaml.SafeLoader):
    """yaml.SafeLoader that also resolves YAML 1.2 floats without a dot or exponent sign (1e-3, 5E4)."""


ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str, source: str) -> Any:
    """Plain data from YAML `text`; `source` (a file name, or the --set argument) names it in errors."""
    loader = ParamsLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except yaml.YAMLError as err:
            raise ConfigError(f"{source}: not valid YAML ({' '.join(str(err).split())})") from err
        except RecursionError:
            raise ConfigError(f"{source}: nested too deeply to be a params file") from None
        if node is None:
            return None
        _check_graph(node, source)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_graph(root: Node, source: str) -> None:
    """Refuse duplicate keys and alias expansion beyond MAX_EXPANDED_NODES, from the node graph
    (aliases are shared nodes there, so this walk visits each node once: linear in the file)."""
    sizes: dict[int, int] = {}

    def walk(node: Node, path: str) -> int:
        if id(node) in sizes:  # an alias: its expansion counts again, its content was checked
            return sizes[id(node)]
        sizes[id(node)] = 0  # a node reached again inside itself (a recursive alias) counts once
        size = 1
        if isinstance(node, SequenceNode):
            for i, item in enumerate(node.value):
                size += walk(item, f"{path}[{i}]")
        elif isinstance(node, MappingNode):
            seen: set[Any] = set()
            for key, value in node.value:
                name = key.value if isinstance(key, ScalarNode) else None
                if name is not None and name != "<<":
                    if (key.tag, name) in seen:
                        raise ConfigError(
                            f"{source}: line {key.start_mark.line + 1}: key '{path}{name}' is given twice "
                            "(the second would silently replace the first); merge them into one"
                        )
                    seen.add((key.tag, name))
                size += walk(key, path) + walk(value, f"{path}{name}." if name is not None else path)
        if size > MAX_EXPANDED_NODES:
            raise ConfigError(
                f"{source}: YAML aliases (*name) expand to more than {MAX_EXPANDED_NODES} values at "
                f"'{path.rstrip('.') or 'top level'}' (an alias bomb?); write the values out instead"
            )
        sizes[id(node)] = size
        return size

    try:
        walk(root, "")
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to be a params file") from None


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
    node[parts[-1]] = load_yaml(text, f"--set {override}")


def load_params(path: str | Path = "params.yaml", overrides: list[str] | tuple[str, ...] = ()) -> Params:
    """Params from a YAML file; a missing file means all defaults."""
    path = Path(path)
    raw: dict[str, Any] = {}
    if path.exists():
        raw = load_yaml(path.read_text(), str(path)) or {}
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
