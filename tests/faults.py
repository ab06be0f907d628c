"""Faults the tests inject into a training run, as callbacks of its loop."""
from __future__ import annotations

import os
import time
from pathlib import Path

from vkd.loop import Callback


class DieOnce(Callback):
    """Rank 0's process dies at ``step``, once: it leaves ``marker`` behind, and a restarted
    run that finds it goes on."""

    def __init__(self, step: int, marker: str):
        self.step, self.marker = step, marker

    def on_step(self, run, report):
        if run.rank == 0 and run.step == self.step and not Path(self.marker).exists():
            Path(self.marker).write_text(str(run.step))
            time.sleep(5)  # let the controller register the last reported checkpoint first
            os._exit(1)
