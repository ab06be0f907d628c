"""The arguments the benchmark scripts share (imported as ``_args``: a script's own folder is
on its ``sys.path``)."""
from __future__ import annotations

import argparse


def parser(doc: str, study: bool = False) -> argparse.ArgumentParser:
    """``--model``, ``--data`` and ``--forget``; with ``study``, also the search space and
    run config of a tune study."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the vanilla model folder")
    ap.add_argument("--data", required=True, help="the benchmark folder")
    ap.add_argument("--forget", default="forget_10")
    if study:
        ap.add_argument("--space", default="tune_spaces/thresholds_grid.yaml")
        ap.add_argument("--config", default="configs/demo.yaml")
    return ap
