"""The environment the stages run in: the variables of the embedded default (loopback only,
no usage stats, auth mode explicit, offline hub), and starting or joining Ray. Entry points
call ``set_environment`` (``run_main`` and the ``vkd`` command do); importing this module
changes nothing."""
from __future__ import annotations

import math
import os
import socket
import sys
from typing import Any

# The embedded default: loopback only, no usage stats, auth mode explicit, offline hub.
RAY_ENV = {
    "HF_HUB_OFFLINE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    # a map function's own exception (a BenchmarkError, a ConfigError) reaches the consumer
    # as itself, not as a UserCodeException whose cause is lost on its way between processes
    "RAY_DATA_RAISE_ORIGINAL_MAP_EXCEPTION": "1",
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


def set_environment() -> None:
    """The variables of ``RAY_ENV`` where the caller has not set them. The hub reads its
    offline switch when it is first imported: a stage started as ``python -m`` has imported
    it already, so it is told as well."""
    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None and os.environ["HF_HUB_OFFLINE"].lower() in ("1", "true", "yes"):
        hub.HF_HUB_OFFLINE = True


def init_ray(num_cpus: int, **kwargs: Any):
    """Join the cluster at ``RAY_ADDRESS``; without one start an in-process Ray with
    ``num_cpus`` logical CPUs, so train workers never starve Ray Data."""
    import ray

    if ray.is_initialized():
        return ray
    set_environment()
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**kwargs)
        return ray
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
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 _node_ip_address="127.0.0.1", configure_logging=False, runtime_env={"env_vars": env}, **kwargs)
    finally:
        if saved is None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
        else:
            os.environ["RAY_GCS_SERVER_PORT"] = saved
    return ray


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def embedded_cpus(workers: int, cpus_per_worker: float, runs: int) -> int:
    """Logical CPUs an embedded Ray needs for ``runs`` concurrent trainers: each one's
    workers plus a CPU for its data tasks (tokenising), and one more for Ray Data's read and
    map tasks (without it, trainers holding every CPU wait forever on data that cannot be
    read)."""
    return int(math.ceil(runs * (workers * cpus_per_worker + 1) + 1))
