"""What every stage's command line shares: argument parsing, the resolved config, refusing
to overwrite, and one clear line (exit status 2) for a user error."""
from __future__ import annotations

import argparse
import sys
import time
import traceback
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


def user_error(err: BaseException) -> BaseException | None:
    """The user error behind ``err``, also when it was raised in a Ray Train worker, a Ray
    Data task or a Ray task and reaches here wrapped (a worker group's failures, a task's
    cause, an exception's cause or context); None when there is none."""
    seen: set[int] = set()
    stack: list[Any] = [err]
    while stack:
        e = stack.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        wrapped = getattr(e, "cause", None)  # a RayTaskError is an instance of its cause's class: take the cause
        if isinstance(e, USER_ERRORS) and not isinstance(wrapped, BaseException):
            return e
        failures = getattr(e, "worker_failures", None) or {}
        stack += [wrapped, getattr(e, "controller_failure", None), *failures.values(), e.__cause__, e.__context__]
    return None


def run_main(fn: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> int:
    """Run a stage in the stages' environment; a user error, raised here or in a worker,
    ends with one clear line and exit status 2; a worker's traceback goes to a log file."""
    set_environment()
    try:
        fn(argv)
    except Exception as err:  # noqa: BLE001 (anything but a user error is raised again)
        found = user_error(err)
        if found is None:
            raise
        where = ""
        if found is not err:
            log = Path(".vkd/logs") / f"error-{time.strftime('%Y%m%d-%H%M%S')}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text("".join(traceback.format_exception(err)))
            where = f" (raised in a worker; traceback in {log})"
        print(f"error: {str(found).splitlines()[0] if str(found) else type(found).__name__}{where}", file=sys.stderr)
        return 2
    return 0
