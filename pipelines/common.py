"""What every stage shares: argument parsing, the resolved config, starting Ray."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

# The embedded default: loopback only, no usage stats, auth mode explicit, offline hub.
RAY_ENV = {
    "HF_HUB_OFFLINE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "DS_ACCELERATOR": "cpu",
    "TOKENIZERS_PARALLELISM": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}
# The in-process Ray only: no spot nodes to watch and no metrics exporter to feed, so each
# Ray Train run starts neither its preemption watcher actor nor its metrics callbacks (a
# process and its imports per run, ~1.5 CPU-s, taken from the trainers of a batch).
EMBEDDED_ENV = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
}
for _k, _v in RAY_ENV.items():
    os.environ.setdefault(_k, _v)

from vkd.config import Config, ConfigError, load_config  # noqa: E402
from vkd.data.layout import BenchmarkError  # noqa: E402
from vkd.model import ModelError  # noqa: E402
from vkd.registry import UnknownName  # noqa: E402

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


def init_ray(cfg: Config, **kwargs: Any):
    """Join the cluster at ``RAY_ADDRESS``; without one start an in-process Ray with
    ``ray.num_cpus`` logical CPUs, so train workers never starve Ray Data."""
    import ray

    if ray.is_initialized():
        return ray
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**kwargs)
    else:
        # The dashboard (loopback only) serves the state API Ray Train's controller polls.
        # address="local": a new in-process Ray even when another one (a `ray start` head) runs
        # here. Its GCS port is chosen up front so that its processes get RAY_ADDRESS: without
        # it, Ray Train's placement-group cleaner finds the cluster in /tmp/ray/ray_current_cluster
        # (an old or another `ray start`) and asks it whether our controller is alive.
        port = free_port()
        for k, v in EMBEDDED_ENV.items():
            os.environ.setdefault(k, v)
        env = {k: os.environ[k] for k in (*RAY_ENV, *EMBEDDED_ENV)} | {"RAY_ADDRESS": f"127.0.0.1:{port}"}
        saved = os.environ.get("RAY_GCS_SERVER_PORT")
        os.environ["RAY_GCS_SERVER_PORT"] = str(port)
        try:
            ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                     _node_ip_address="127.0.0.1", configure_logging=False, runtime_env={"env_vars": env}, **kwargs)
        finally:
            if saved is None:
                os.environ.pop("RAY_GCS_SERVER_PORT", None)
            else:
                os.environ["RAY_GCS_SERVER_PORT"] = saved
    return ray


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def embedded_cpus(cfg: Config, runs: int) -> int:
    """Logical CPUs an embedded Ray needs for ``runs`` concurrent trainers: each one's
    workers plus a CPU for its data tasks (tokenising), and one more for Ray Data's read and map tasks
    (without it, trainers holding every CPU wait forever on data that cannot be read)."""
    import math

    return int(math.ceil(runs * (cfg.train.workers * cfg.train.cpus_per_worker + 1) + 1))


def refuse_existing(path: str | Path, overwrite: bool, flag: str = "--out") -> Path:
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another {flag} or pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def run_main(fn: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> int:
    """Run a stage; user errors end with one clear line and exit status 2, not a traceback."""
    try:
        fn(argv)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
