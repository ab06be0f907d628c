"""The unlearning report: report.md (both evaluations, every key with its goal, the
lookalikes, the relearning attack and the run's figures) and report.png (the headline
keys, starting model against unlearned)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from vkd.metrics import DIRECTIONS, KEYS, MC_CHANCE


def write_report(out: Path, title: str, before: dict[str, float], after: dict[str, float], figures: dict[str, Any],
                 lookalikes: dict[str, list[str]] | None = None, relearn: dict[str, Any] | None = None) -> list[Path]:
    """report.md and report.png in ``out``; returns their paths."""
    (out / "report.md").write_text(report_markdown(title, before, after, figures, lookalikes, relearn))
    plot_report(out / "report.png", title, before, after)
    return [out / "report.md", out / "report.png"]


def _fmt(v: float | None) -> str:
    return f"{v:.3f}" if v is not None else ""


def report_markdown(title: str, before: dict[str, float], after: dict[str, float], figures: dict[str, Any],
                    lookalikes: dict[str, list[str]] | None = None, relearn: dict[str, Any] | None = None) -> str:
    lines = [f"# {title}", "", "| metric | goal | before | after | change |", "| --- | --- | --- | --- | --- |"]
    for key in sorted(set(before) | set(after)):
        b, a = before.get(key), after.get(key)
        change = f"{a - b:+.3f}" if a is not None and b is not None else ""
        lines.append(f"| {key} | {DIRECTIONS.get(key, '')} | {_fmt(b)} | {_fmt(a)} | {change} |")
    missing = [k for k in KEYS if k not in before]
    if missing:
        lines += ["", f"Not measured on this benchmark or evaluation: {', '.join(missing)}."]
    if lookalikes:
        lines += ["", "Lookalikes (the retain entities nearest each forget entity to the starting model):", ""]
        lines += [f"- {e}: {', '.join(ids)}" for e, ids in sorted(lookalikes.items())]
    if relearn:
        lines += ["", f"## Relearning attack ({len(relearn['folds'])} over {relearn['mode']})", "",
                  "| gap | mean | min | max |", "| --- | --- | --- | --- |"]
        lines += [f"| {k} | {v:+.3f} | {relearn['spread'][k][0]:+.3f} | {relearn['spread'][k][1]:+.3f} |"
                  for k, v in relearn["gaps"].items()]
        lines += ["", "| held-out entity | " + " | ".join(relearn["gaps"]) + " |", "|" + " --- |" * (len(relearn["gaps"]) + 1)]
        lines += [f"| {e} | " + " | ".join(f"{g.get(k, 0.0):+.3f}" for k in relearn["gaps"]) + " |"
                  for e, g in sorted(relearn["per_entity"].items())]
    lines += ["", "| figure | value |", "| --- | --- |"]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in figures.items()]
    return "\n".join(lines) + "\n"


def plot_report(path: Path, title: str, before: dict[str, float], after: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in KEYS if k in before]
    fig, ax = plt.subplots(figsize=(max(7, 0.6 * len(keys)), 4))
    xs = range(len(keys))
    ax.bar([x - 0.2 for x in xs], [before[k] for k in keys], width=0.4, label="vanilla")
    ax.bar([x + 0.2 for x in xs], [after.get(k, 0.0) for k in keys], width=0.4, label="unlearned")
    ax.set_xticks(list(xs), keys, rotation=60, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    ax.axhline(MC_CHANCE, color="grey", lw=0.8, ls="--", label="chance (multiple choice)")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
