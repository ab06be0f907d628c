"""The one trainer: Ray Train workers (or, for one worker, the caller's process), each
driving a DeepSpeed engine through ``vkd.loop``, fed by Ray Data.

``job`` says what a run is, ``data`` makes its Ray Data streams, ``worker`` is one rank
(engine, feed, callbacks), ``launch`` starts the run and copies out the final model."""
from pipelines.train.data import finetune_plans, fitted, starts_mid_way, train_dataset, train_datasets, unlearn_trainer
from pipelines.train.job import Rungs, Tracking, TrainJob
from pipelines.train.launch import fit, run_training, torch_trainer

__all__ = ["Rungs", "Tracking", "TrainJob", "finetune_plans", "fit", "fitted", "run_training", "starts_mid_way", "torch_trainer",
           "train_dataset", "train_datasets", "unlearn_trainer"]
