"""The unlearning report: report.md (both evaluations, every key with its goal, and the
run's figures) and report.png (the multiple-choice keys, starting model against unlearned)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from vkd.metrics import DIRECTIONS, MC_KEYS
from vkd.study import CHANCE


def write_report(out: Path, title: str, before: dict[str, float], after: dict[str, float],
                 figures: dict[str, Any]) -> list[Path]:
    """report.md and report.png in ``out``; returns their paths."""
    (out / "report.md").write_text(report_markdown(title, before, after, figures))
    plot_report(out / "report.png", title, before, after)
    return [out / "report.md", out / "report.png"]


def report_markdown(title: str, before: dict[str, float], after: dict[str, float], figures: dict[str, Any]) -> str:
    def fmt(v: float | None) -> str:
        return f"{v:.3f}" if v is not None else ""

    lines = [f"# {title}", "", "| metric | goal | before | after | change |", "| --- | --- | --- | --- | --- |"]
    for key in sorted(set(before) | set(after)):
        b, a = before.get(key), after.get(key)
        change = f"{a - b:+.3f}" if a is not None and b is not None else ""
        lines.append(f"| {key} | {DIRECTIONS.get(key, '')} | {fmt(b)} | {fmt(a)} | {change} |")
    lines += ["", "| figure | value |", "| --- | --- |"]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in figures.items()]
    return "\n".join(lines) + "\n"


def plot_report(path: Path, title: str, before: dict[str, float], after: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in MC_KEYS if k in before]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    xs = range(len(keys))
    ax.bar([x - 0.2 for x in xs], [before[k] for k in keys], width=0.4, label="vanilla")
    ax.bar([x + 0.2 for x in xs], [after.get(k, 0.0) for k in keys], width=0.4, label="unlearned")
    ax.set_xticks(list(xs), keys)
    ax.set_ylim(0, 1)
    ax.axhline(CHANCE, color="grey", lw=0.8, ls="--", label="chance")
    ax.set_ylabel("multiple-choice accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
