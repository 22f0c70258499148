"""Shared command-line plumbing: config loading and one-line errors with a non-zero exit."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path

from atoms.core.config import load_yaml
from atoms.core.errors import AtomsError

CONFIGS = Path(__file__).with_name("configs")


def config_parser(description: str, default_config: Path) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", type=Path, default=default_config,
                        help=f"YAML config (default: {default_config})")
    parser.add_argument("--out", default=None,
                        help="output folder or storage URI such as s3://bucket/prefix "
                        "(overrides config)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def load_config(cls, args: argparse.Namespace):
    overrides = {"out": str(args.out)} if args.out is not None else None
    if overrides and "out" not in {f.name for f in dataclasses.fields(cls)}:
        overrides = None
    return load_yaml(cls, args.config, overrides)


def run(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> int:
    """Call ``main``; an AtomsError becomes one line on stderr and exit status 2."""
    try:
        main(argv)
    except AtomsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
