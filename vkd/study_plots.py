"""What a study leaves in its folder: the table of trials (CSV and markdown) and the plots
of sensitivity, pairs of parameters and the Pareto front."""
from __future__ import annotations

import csv
import itertools
from pathlib import Path
from typing import Any

from vkd.metrics import KEYS, MC_CHANCE
from vkd.study import SearchSpace, pareto_front

TABLE_METRICS = ["objective", "forgetting", "preservation", *KEYS]
SHOWN = ["objective", "forget_vqa", "test_vqa", "forget_vqa_gen", "retain_vqa", "retain_test_vqa", "lookalike_vqa",
         "lookalike_vqa_gen"]


def _label(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _sorted_values(rows: list[dict[str, Any]], name: str) -> list[Any]:
    return sorted({r[name] for r in rows}, key=lambda v: (isinstance(v, str), v))


def write_outputs(out: str | Path, space: SearchSpace, rows: list[dict[str, Any]]) -> list[Path]:
    """trials.csv and trials.md (one row per trial, best first), sensitivity.png (objective
    and the multiple-choice keys against each parameter), heatmaps.png (the mean objective
    over each pair of parameters) and pareto.png (forgetting against preservation, the front
    marked). ``rows``: a dict per trial with its parameters (dotted names), objective,
    forgetting, preservation, the evaluation keys, seconds and status (a trial stopped
    early: its last rung, no objective)."""
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out)
    done = sorted((r for r in rows if r.get("objective") is not None), key=lambda r: -r["objective"])
    front = set(pareto_front([(r["forgetting"], r["preservation"]) for r in done]))
    paths = _write_tables(out, space, rows, done, front)
    if not done:
        return paths
    paths.append(_plot_sensitivity(out, space, done))
    if len(space.parameters) > 1:
        paths.append(_plot_heatmaps(out, space, done))
    paths.append(_plot_pareto(out, space, done, front))
    return paths


def _write_tables(out: Path, space: SearchSpace, rows: list[dict[str, Any]], done: list[dict[str, Any]],
                  front: set[int]) -> list[Path]:
    params = list(space.parameters)
    columns = ["trial", "status", *params, *TABLE_METRICS, "reports", "seconds", "pareto", "last_rung"]
    table = [{**r, "pareto": i in front} for i, r in enumerate(done)] + [r for r in rows if r.get("objective") is None]
    with (out / "trials.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(table)

    def cell(v: Any, column: str) -> str:  # parameters as given (a learning rate of 7e-4 stays 7e-4)
        if isinstance(v, float):
            return f"{v:.4g}" if column in params else f"{v:.3f}"
        return "" if v is None else str(v)
    md = [f"# Study {space.name}", "", f"{len(done)} of {len(rows)} trials finished; objective: vkd.study.objective "
          "(higher is better); pareto: on the front of forgetting vs preservation.", "",
          "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    md += ["| " + " | ".join(cell(r.get(c), c) for c in columns) + " |" for r in table]
    (out / "trials.md").write_text("\n".join(md) + "\n")
    return [out / "trials.csv", out / "trials.md"]


def _plot_sensitivity(out: Path, space: SearchSpace, done: list[dict[str, Any]]) -> Path:
    import matplotlib.pyplot as plt
    import numpy as np

    params = list(space.parameters)
    fig, axes = plt.subplots(len(params), 1, figsize=(7, 3.2 * len(params)), squeeze=False)
    for ax, name in zip(axes[:, 0], params):
        values = _sorted_values(done, name)
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        xs_of = (lambda v: v) if numeric else (lambda v: values.index(v))
        for key in SHOWN:
            xs = [xs_of(r[name]) for r in done]
            ax.scatter(xs, [r.get(key, np.nan) for r in done], s=14, alpha=0.5)
            means = [np.mean([r.get(key, np.nan) for r in done if r[name] == v]) for v in values]
            ax.plot([xs_of(v) for v in values], means, marker="o", label=key, lw=2 if key == "objective" else 1)
        if not numeric:
            ax.set_xticks(range(len(values)), [_label(v) for v in values])
        ax.set_xlabel(name)
        ax.set_ylim(0, 1.05)
        ax.axhline(MC_CHANCE, color="grey", lw=0.8, ls="--")
        ax.legend(fontsize=7, ncol=3)
    fig.suptitle(f"{space.name}: sensitivity (lines: mean per value)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "sensitivity.png", dpi=100)
    plt.close(fig)
    return out / "sensitivity.png"


def _pair_grid(done: list[dict[str, Any]], a: str, b: str):
    """The mean objective over the values of two parameters (continuous ones binned by
    quartile): the grid, and the tick labels of each axis."""
    import numpy as np

    va, vb = _sorted_values(done, a), _sorted_values(done, b)
    if len(va) * len(vb) > 400:  # continuous values: bin them
        qa, qb = np.quantile([r[a] for r in done], [0, .25, .5, .75, 1]), np.quantile([r[b] for r in done],
                                                                                     [0, .25, .5, .75, 1])
        ia = lambda v: min(int(np.searchsorted(qa, v, side="right")) - 1, 3)  # noqa: E731
        ib = lambda v: min(int(np.searchsorted(qb, v, side="right")) - 1, 3)  # noqa: E731
        va, vb = [f"q{i + 1}" for i in range(4)], [f"q{i + 1}" for i in range(4)]
    else:
        ia, ib = va.index, vb.index
    grid = np.full((len(vb), len(va)), np.nan)
    for i, j in itertools.product(range(len(va)), range(len(vb))):
        hits = [r["objective"] for r in done if ia(r[a]) == i and ib(r[b]) == j]
        grid[j, i] = np.mean(hits) if hits else np.nan
    return grid, [_label(v) for v in va], [_label(v) for v in vb]


def _plot_heatmaps(out: Path, space: SearchSpace, done: list[dict[str, Any]]) -> Path:
    import matplotlib.pyplot as plt
    import numpy as np

    pairs = list(itertools.combinations(space.parameters, 2))
    fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 4), squeeze=False)
    for ax, (a, b) in zip(axes[0], pairs):
        grid, la, lb = _pair_grid(done, a, b)
        im = ax.imshow(grid, origin="lower", cmap="viridis", vmin=0, vmax=1, aspect="auto")
        for i, j in itertools.product(range(len(la)), range(len(lb))):
            if not np.isnan(grid[j, i]):
                ax.text(i, j, f"{grid[j, i]:.2f}", ha="center", va="center", fontsize=7, color="w")
        ax.set_xticks(range(len(la)), la)
        ax.set_yticks(range(len(lb)), lb)
        ax.set_xlabel(a)
        ax.set_ylabel(b)
        fig.colorbar(im, ax=ax, label="mean objective")
    fig.tight_layout()
    fig.savefig(out / "heatmaps.png", dpi=100)
    plt.close(fig)
    return out / "heatmaps.png"


def _plot_pareto(out: Path, space: SearchSpace, done: list[dict[str, Any]], front: set[int]) -> Path:
    import matplotlib.pyplot as plt

    params = list(space.parameters)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.scatter([r["forgetting"] for r in done], [r["preservation"] for r in done], s=18, label="trials")
    line = sorted((done[i]["forgetting"], done[i]["preservation"]) for i in front)
    ax.plot([p[0] for p in line], [p[1] for p in line], color="C3", marker="o", label="Pareto front")
    for i in front:
        ax.annotate(", ".join(_label(done[i][n]) for n in params), (done[i]["forgetting"], done[i]["preservation"]),
                    fontsize=6)
    ax.set_xlabel("forgetting (share of the margin over chance gone)")
    ax.set_ylabel("preservation (kept share of the vanilla scores)")
    ax.set_title(f"{space.name}: forgetting vs preservation", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=100)
    plt.close(fig)
    return out / "pareto.png"
