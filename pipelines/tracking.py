"""MLflow: every stage run is an MLflow run; models are logged and registered with aliases.

Tracking URI: the config's ``mlflow.uri``, else ``MLFLOW_TRACKING_URI`` when set (a server),
else a SQLite file in the working folder. The experiment is created here, with an explicit artifact location, so Ray workers
never have to create it.
"""
from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from vkd.cache import Cache
from vkd.config import Config, TrackingConfig, flatten
from vkd.model import ModelError


def tracking_uri(cfg: TrackingConfig) -> str:
    """``mlflow.uri``, else MLFLOW_TRACKING_URI, else the SQLite file."""
    return cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(cfg.sqlite_file).resolve()}"


def resolved(cfg: Config) -> Config:
    """``cfg`` with its tracking URI written in and its file paths absolute: what a Ray task,
    trial or job elsewhere needs to record where this process would."""
    out = cfg.updated([])
    out.mlflow.uri = tracking_uri(cfg.mlflow)
    out.mlflow.sqlite_file = str(Path(cfg.mlflow.sqlite_file).resolve())
    out.mlflow.artifact_dir = str(Path(cfg.mlflow.artifact_dir).resolve())
    return out


def ui_hint(cfg: TrackingConfig) -> str:
    """How to look at the runs and registered models in the MLflow UI."""
    uri = tracking_uri(cfg)
    if not uri.startswith("sqlite:"):
        return f"MLflow UI: the tracking server at {uri}"
    return (f"MLflow UI: .venv/bin/mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000\n"
            "           then open http://127.0.0.1:5000 (runs under the experiment, models under Models)")


def use_tracking(cfg: TrackingConfig) -> None:
    """Point this process's MLflow at ``cfg``'s store. MLflow's ``set_tracking_uri`` also
    exports MLFLOW_TRACKING_URI, which would make every later config in this process (and
    every child process) record to the first store; the variable is put back as it was."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri(cfg))
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def experiment_id(cfg: TrackingConfig) -> str:
    use_tracking(cfg)
    found = mlflow.get_experiment_by_name(cfg.experiment)
    if found is not None:
        return found.experiment_id
    location = None
    if tracking_uri(cfg).startswith("sqlite:"):
        location = Path(cfg.artifact_dir).resolve().as_uri()
    try:
        return mlflow.create_experiment(cfg.experiment, artifact_location=location)
    except Exception:  # created concurrently by another stage
        return mlflow.get_experiment_by_name(cfg.experiment).experiment_id


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@contextmanager
def stage_run(cfg: Config, stage: str, tags: dict[str, str], run_name: str | None = None,
              run_id: str | None = None) -> Iterator[Any]:
    """An MLflow run holding the resolved config as params and the standard tags (``run_id``:
    go on in that run, a tune trial resumed from a rung). A Tune scheduler that stops the
    trial inside it (SystemExit) leaves the run KILLED, not FAILED."""
    all_tags = {"stage": stage, "config_hash": cfg.hash(), "git_sha": git_sha(), **tags}
    where = {"run_id": run_id} if run_id else {"experiment_id": experiment_id(cfg.mlflow), "run_name": run_name or stage}
    with mlflow.start_run(tags=all_tags, **where) as run:
        try:
            mlflow.log_params({k: str(v)[:500] for k, v in flatten(cfg.to_dict()).items()})
            yield run
        except SystemExit:
            mlflow.end_run("KILLED")
            raise


def log_model(run_id: str, folder: str | Path, name: str, aliases: list[str], register: bool) -> int | None:
    """Log a Hugging Face folder as the run's ``model`` artifact; register it as a new
    version of ``name`` and point ``aliases`` at it. Returns the version."""
    MlflowClient().log_artifacts(run_id, str(folder), artifact_path="model")
    if not register:
        return None
    return register_version(run_id, name, aliases)


def register_version(run_id: str, name: str, aliases: list[str], tags: dict[str, str] | None = None,
                     unique_tag: str | None = None) -> int:
    """Register the run's ``model`` artifact as a version of ``name`` with ``aliases``.
    With ``unique_tag`` (a key of ``tags``), a version that already carries that tag value
    is reused, so a retried request never registers twice."""
    client = MlflowClient()
    tags = {"run_id": run_id, **(tags or {})}
    try:
        client.create_registered_model(name)
    except MlflowException:
        pass  # already registered: add a version
    version = None
    if unique_tag:
        found = [v for v in client.search_model_versions(f"name = '{name}'")
                 if v.tags.get(unique_tag) == tags[unique_tag]]
        version = found[0] if found else None
    if version is None:
        source = f"{client.get_run(run_id).info.artifact_uri}/model"
        version = client.create_model_version(name, source, run_id=run_id, tags=tags)
    for alias in aliases:
        client.set_registered_model_alias(name, alias, version.version)
    return int(version.version)


def registered_model(spec: str, cfg: TrackingConfig, cache: str | Path) -> Path:
    """A registered model (``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``) as a local
    Hugging Face folder, downloaded once into the cache's ``models``."""
    ref = spec[len("models:/"):]
    client = MlflowClient(tracking_uri(cfg))
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, number = ref.rsplit("/", 1)
            version = client.get_model_version(name, number)
    except (MlflowException, ValueError) as err:
        raise ModelError(f"model {spec}: not in the registry at {tracking_uri(cfg)} ({str(err)[:200]}); "
                         "give a registered NAME@ALIAS or NAME/VERSION, or a model folder") from None

    def download(tmp: Path) -> None:
        tmp.mkdir()
        mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(tmp),
                                            tracking_uri=tracking_uri(cfg))
        inner = tmp / Path(version.source).name
        if (inner / "config.json").is_file():  # the folder itself, not the one holding it
            for item in inner.iterdir():
                item.rename(tmp / item.name)
            inner.rmdir()
    return Cache(cache, "models").get_or_make(f"{name}-v{version.version}", download)
