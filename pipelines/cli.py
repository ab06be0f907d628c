"""The `vkd` console command: `vkd <stage> ...` runs `python -m pipelines.<stage> ...`."""
from __future__ import annotations

import importlib
import sys
from typing import Sequence

from pipelines.runtime import set_environment

STAGES = {
    "prepare": "make or ingest a benchmark into parquet shards",
    "vanilla": "fine-tune the base model on every entity (the teacher), on Ray Train + DeepSpeed",
    "evaluate": "multiple-choice, generation and cloze metrics on Ray Data",
    "unlearn": "make a model forget what the forget split's entities look like (vkd or a baseline)",
    "relearn": "the relearning attack on an unlearned model: Accuracy Gap on held-out forget entities",
    "tune": "a sensitivity study over a search space (tune_spaces/*.yaml) on Ray Tune",
    "batch": "many removal requests from a manifest, resumable (Ray tasks; runs under `ray job submit`)",
    "demo": "the main job end to end: prepare, vanilla, evaluate, unlearn (VKD), printing the tables",
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STAGES:
        width = max(map(len, STAGES))
        lines = [f"  {name:<{width}}  {text}" for name, text in STAGES.items()]
        print("usage: vkd <stage> [--config F] [options] [key=value ...]\n\nstages:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown stage {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    set_environment()  # before the stage imports the hub, Ray and MLflow
    module = importlib.import_module(f"pipelines.{argv[0]}")
    return module.run_main(module.main, argv[1:])


if __name__ == "__main__":
    sys.exit(main())
