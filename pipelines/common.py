"""What every stage's command line shares: argument parsing, the resolved config, refusing
to overwrite, and one clear line (exit status 2) for a user error."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from pipelines.runtime import set_environment
from vkd.config import Config, ConfigError, load_config
from vkd.data.layout import BenchmarkError
from vkd.model import ModelError
from vkd.registry import UnknownName

USER_ERRORS = (ConfigError, BenchmarkError, ModelError, FileExistsError, UnknownName)


def parser(stage: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"vkd {stage}", description=description)
    p.add_argument("--config", help="YAML config (e.g. configs/demo.yaml); flags and key=value override it")
    p.epilog = "Trailing key=value arguments override nested config fields, e.g. eval.batch_size=16."
    return p


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse flags; trailing ``key=value`` arguments become ``args.overrides``."""
    args, rest = p.parse_known_args(argv)
    unknown = [r for r in rest if r.startswith("-") or "=" not in r]
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [r for r in rest if r not in unknown]
    return args


def resolve_config(args: argparse.Namespace, extra: dict[str, Any] | None = None) -> Config:
    return load_config(args.config, args.overrides, extra)


def refuse_existing(path: str | Path, overwrite: bool, flag: str = "--out") -> Path:
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another {flag} or pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def run_main(fn: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> int:
    """Run a stage in the stages' environment; user errors end with one clear line and exit
    status 2, not a traceback."""
    set_environment()
    try:
        fn(argv)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
