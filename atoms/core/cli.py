"""Command-line plumbing for the entry points: a parser whose ``--help`` lists every config
field with its docstring, config loading, and one-line errors with a non-zero exit."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import sys
import textwrap
import typing
from collections.abc import Callable
from pathlib import Path

from atoms.core.config import load_yaml
from atoms.core.errors import AtomsError


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of dataclass ``cls`` (and its bases)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for stmt, nxt in zip(body, body[1:], strict=False):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _nested(tp) -> type | None:
    """The dataclass a field holds (directly, or as the items of a list)."""
    if dataclasses.is_dataclass(tp):
        return tp
    for arm in typing.get_args(tp):
        if dataclasses.is_dataclass(arm):
            return arm
    return None


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        return "" if dataclasses.is_dataclass(value) else repr(value)
    return "required"


def describe_fields(cls: type, prefix: str = "") -> list[str]:
    """One line per config field, nested blocks dotted: ``name (default): docstring``."""
    hints, docs, lines = typing.get_type_hints(cls), field_docs(cls), []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        name, inner = f"{prefix}{f.name}", _nested(hints[f.name])
        default = _default(f)
        head = f"  {name}" + (f" ({default})" if default else "")
        doc = docs.get(f.name, "")
        lines.append(f"{head}: {doc}" if doc else head)
        if inner is not None:
            lines += describe_fields(inner, f"{name}.")
    return lines


def config_parser(description: str, default_config: Path, cls: type
                  ) -> argparse.ArgumentParser:
    """``--config``, ``--out`` and ``--quiet``; ``--help`` ends with the fields of ``cls``."""
    epilog = f"config fields ({cls.__name__}, YAML keys):\n" + "\n".join(describe_fields(cls))
    parser = argparse.ArgumentParser(description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=default_config,
                        help=f"YAML config (default: {default_config})")
    parser.add_argument("--out", default=None,
                        help="output folder or storage URI such as s3://bucket/prefix "
                        "(overrides config)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def load_config(cls, args: argparse.Namespace):
    """``args.config`` as ``cls``, with ``--out`` applied when ``cls`` has an ``out`` field."""
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
