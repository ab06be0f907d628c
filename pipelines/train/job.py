"""What a training run is, as it travels to the trainer's workers (pickled whole by Ray)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vkd.config import TrainConfig
from vkd.loop import Callback
from vkd.methods import FineTune, Method
from vkd.probe import ProbeSpec


@dataclass
class Tracking:
    """The MLflow run a trainer's rank 0 logs its steps to."""
    uri: str
    run_id: str


@dataclass
class Rungs:
    """A tune trial's rung states (in process only): the training state is saved at the
    ``save_at`` steps into ``folder/<step>``; ``resume`` > 0 goes on from ``folder/<resume>``."""
    folder: str
    save_at: list[int] = field(default_factory=list)
    resume: int = 0

    @property
    def resume_dir(self) -> str:
        return str(Path(self.folder) / str(self.resume)) if self.resume else ""


@dataclass
class TrainJob:
    model_path: str                    # the starting weights
    out_dir: str                       # the final Hugging Face folder
    cfg: TrainConfig
    total_steps: int
    method: Method = field(default_factory=FineTune)   # which parameters train, the streams, the loss
    masks_path: str | None = None      # torch.save'd {param name: 0/1 tensor}
    reference_path: str | None = None  # frozen reference model (methods that need one)
    teacher_path: str | None = None    # torch.save'd {image key: {feature name: tensor}}
    tracking: Tracking | None = None
    probe: ProbeSpec | None = None     # in-run evaluation on rank 0
    name: str = "train"
    local: bool = False                # one rank in the caller's process (see run_training)
    rungs: Rungs | None = None
    # per dataset, sequences a resumed run passes over before its first batch (a stream too
    # large to start mid-way, see pipelines.train.data.train_dataset's skip)
    discard: dict[str, int] = field(default_factory=dict)
    callbacks: list[Callback] = field(default_factory=list)   # run first after each step (tests inject faults)

    @property
    def in_process(self) -> bool:
        """Whether the loop runs in this process: a tune trial's (``local``), or one CPU
        worker's with ``train.in_process`` (several workers or a GPU: Ray Train)."""
        return self.local or (self.cfg.in_process and self.cfg.workers == 1 and not self.cfg.use_gpu)
