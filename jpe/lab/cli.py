"""Command-line flags read off the lab's config dataclasses, so no command line restates them.

`add_fields(parser, Config)` adds one `--field-name` flag per field, typed from the field's
annotation and documented from the class docstring's `Attributes:` section, with the field's
default shown. Every flag defaults to "not given" (None), so a preset's value stands unless a
flag overrides it; `given(args, Config)` returns the flags that were given, ready for
`dataclasses.replace`.

`add_compilation_cache(parser)` and `enable_compilation_cache(args.compilation_cache)` give
every training command line JAX's persistent compilation cache, on by default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "add_compilation_cache",
    "add_fields",
    "compilation_cache_dir",
    "enable_compilation_cache",
    "given",
    "ints",
    "load_preset",
    "names",
    "run_or_exit_code",
]


def ints(text: str) -> tuple[int, ...]:
    """`"64,128"` -> (64, 128); positive integers only."""
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 0, got {text!r}")
    return values


def names(text: str) -> tuple[str, ...]:
    """`"rope, alibi"` -> ("rope", "alibi"); an empty string gives ()."""
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _json_mapping(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _field_help(cls) -> dict[str, str]:
    """`{field: text}` from the `Attributes:` section of `cls`'s docstring (a line `a, b:
    text` documents both, continuation lines are joined)."""
    doc = cls.__doc__ or ""
    if "Attributes:" not in doc:
        return {}
    out, current = {}, []
    for line in doc.split("Attributes:", 1)[1].splitlines():
        match = re.match(r"^ {6}(\w+(?:, \w+)*):\s*(.*)$", line)
        if match:
            current = [n.strip() for n in match.group(1).split(",")]
            for name in current:
                out[name] = match.group(2)
        elif line.strip() and current:
            for name in current:
                out[name] += " " + line.strip()
        elif not line.strip() and out:
            current = []
    return out


def _converter(annotation):
    """The argparse `type` for a field's annotation, and whether it is a boolean switch."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _converter(args[0])
    if annotation is bool:
        return None, True
    if annotation in (int, float, str):
        return annotation, False
    if origin is tuple:
        inner = typing.get_args(annotation)[0]
        return (ints if inner is int else names), False
    if annotation is Mapping or origin is Mapping or Mapping in args:
        return _json_mapping, False
    for arg in args:  # e.g. `Options | Mapping | None`
        if typing.get_origin(arg) is Mapping or arg is Mapping:
            return _json_mapping, False
    return str, False


def add_fields(
    parser: argparse.ArgumentParser,
    cls,
    *,
    skip: Iterable[str] = (),
    flags: Mapping[str, str] | None = None,
    extra_help: Mapping[str, str] | None = None,
    values=None,
) -> None:
    """Adds `--field-name` for each field of dataclass `cls` not in `skip`.

    `flags` renames a field's flag (`{"pes": "--pe"}`); `extra_help` appends to its help;
    `values`, an instance of `cls` (a preset), supplies the defaults shown in the help
    instead of the field defaults.
    """
    hints = typing.get_type_hints(cls)
    helps = _field_help(cls)
    flags, extra_help = dict(flags or {}), dict(extra_help or {})
    existing = {s for action in parser._actions for s in action.option_strings}
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        flag = flags.get(field.name, "--" + field.name.replace("_", "-"))
        if flag in existing:
            continue
        convert, switch = _converter(hints[field.name])
        default = field.default if field.default is not dataclasses.MISSING else None
        if values is not None:
            default = getattr(values, field.name)
        text = helps.get(field.name, "")
        if extra_help.get(field.name):
            text = f"{text} {extra_help[field.name]}".strip()
        if default not in (None, (), "") and not dataclasses.is_dataclass(default):
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            text += f" (default {shown})"
        text = text.replace("%", "%%")
        if switch:
            parser.add_argument(
                flag, dest=field.name, action=argparse.BooleanOptionalAction, default=None,
                help=text,
            )  # fmt: skip
        else:
            parser.add_argument(flag, dest=field.name, type=convert, default=None, help=text)


def given(args: argparse.Namespace, cls, *, skip: Iterable[str] = ()) -> dict:
    """The fields of `cls` whose flags were given, as `{field: value}`."""
    return {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(cls)
        if f.name not in skip and getattr(args, f.name, None) is not None
    }


def load_preset(directory: Path, name: str):
    """`directory/NAME.py`'s `get_config()`; an unknown name lists the presets.

    Presets are code (as in big_vision and Flax's examples): each file defines `get_config()`
    returning the lab's config object, and its docstring gives the command, the hardware, the
    run time and the expected metric.
    """
    import importlib.util

    path = Path(directory) / f"{name}.py"
    if not path.is_file():
        found = sorted(p.stem for p in Path(directory).glob("*.py") if not p.stem.startswith("_"))
        raise ValueError(f"unknown --config {name!r}; presets in {directory}: {', '.join(found)}")
    spec = importlib.util.spec_from_file_location(f"jpe_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise ValueError(f"preset {path} must define get_config()")
    return module.get_config()


def run_or_exit_code(run: Callable[[], Any]) -> tuple[Any, int]:
    """`(run(), 0)`, or `(None, code)` after printing `error: ...` to stderr: code 2 for bad
    input (`ValueError`), 3 for a loss that became NaN or infinite (`NonFiniteLossError`).
    The command lines' one way of turning failures into exit codes."""
    import sys

    from jpe.lab.core import NonFiniteLossError

    try:
        return run(), 0
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return None, 2
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return None, 3


# ---------------------------------------------------------------------------------------------
# JAX's persistent compilation cache
# ---------------------------------------------------------------------------------------------

#: the environment variable naming the cache directory ("off" or empty: no cache)
CACHE_ENV = "JPE_CACHE_DIR"
_OFF = ("", "off")


def compilation_cache_dir(path: str | Path | None = None) -> Path | None:
    """The directory `enable_compilation_cache(path)` uses, or None for no cache.

    `path` None: `$JPE_CACHE_DIR` when set, else `~/.cache/jpe/xla`. `"off"` or `""` (as
    `path` or as `$JPE_CACHE_DIR`): no cache. Any other value: that directory (`~` expanded).
    """
    if path is None:
        path = os.environ.get(CACHE_ENV)
        if path is None:
            return Path.home() / ".cache" / "jpe" / "xla"
    if str(path).strip().lower() in _OFF:
        return None
    return Path(path).expanduser()


def enable_compilation_cache(
    path: str | Path | None = None, *, min_compile_seconds: float = 0.1
) -> Path | None:
    """Turns on JAX's persistent compilation cache, so that a command run again (another
    encoding, seed or resumption of the same shapes) loads its executables from disk instead
    of compiling them.

    Sets `jax_compilation_cache_dir` to the directory `compilation_cache_dir(path)` picks
    (`path` None: `$JPE_CACHE_DIR`, else `~/.cache/jpe/xla`; `"off"` or `""`: off, which sets
    it to None), `jax_persistent_cache_min_compile_time_secs` to `min_compile_seconds` (JAX's
    default, 1 s, would skip the CPU compiles of a few hundred ms that a small lab is made
    of) and `jax_persistent_cache_min_entry_size_bytes` to -1 (no size limit). Entries are
    keyed by JAX on the program, the compile options, the devices and the jax/jaxlib
    versions, so a stale entry is never used. Call it before the first compilation: JAX
    opens the cache once per process.

    Returns:
      the cache directory (created), or None when off.
    """
    import jax

    directory = compilation_cache_dir(path)
    if directory is None:
        jax.config.update("jax_compilation_cache_dir", None)
        return None
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return directory


def add_compilation_cache(parser: argparse.ArgumentParser) -> None:
    """Adds `--compilation-cache DIR` and `--no-compilation-cache` (both set
    `args.compilation_cache`, None when neither is given) for `enable_compilation_cache`."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--compilation-cache",
        metavar="DIR",
        dest="compilation_cache",
        default=None,
        help=f"JAX's persistent compilation cache (default ${CACHE_ENV}, else ~/.cache/jpe/xla; "
        "'off' disables it)",
    )
    group.add_argument(
        "--no-compilation-cache",
        dest="compilation_cache",
        action="store_const",
        const="off",
        help="compile everything afresh, caching nothing on disk",
    )
