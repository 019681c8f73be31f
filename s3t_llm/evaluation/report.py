"""Plots and table cells that the demo (``s3t demo``) and the deletion-stream experiment share.

A measurement point is a dict ``{"requests": int, "depth": mean served depth (blocks per shard), "tasks":
{task: {"acc", "acc_stderr"}}, "heldout_loss": float, "heldout_loss_stderr": float}`` (missing keys are gaps).
Every point is drawn with its standard error: lm-eval's ``acc_stderr`` for accuracies, the ratio-estimator
standard error of the per-token held-out loss (:func:`s3t_llm.evaluation.scorers.ratio_stderr`); a reference
model (base, full fine-tune) is a horizontal line with its standard-error band.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence


@dataclass
class Series:
    """One curve of measurements against deletion requests."""

    label: str
    points: list[dict]
    style: dict = field(default_factory=dict)  # matplotlib keywords (lw, marker, ...)


@dataclass
class Reference:
    """A model drawn as a horizontal line: ``tasks`` {task: {"acc", "acc_stderr"}}, held-out loss and its SE."""

    label: str
    tasks: Mapping[str, Mapping[str, float]]
    heldout_loss: float | None = None
    heldout_loss_stderr: float | None = None
    color: str = "gray"
    ls: str = "--"


def _num(x) -> float:
    return math.nan if x is None else float(x)


def acc_cell(v: Mapping[str, Any] | None, digits: int = 1) -> str:
    """``54.2 ± 3.1`` (percent, with lm-eval's standard error), or ``n/a``."""
    if not v or v.get("acc") is None:
        return "n/a"
    se = v.get("acc_stderr")
    tail = f" ± {100 * se:.{digits}f}" if se is not None and not math.isnan(se) else ""
    return f"{100 * v['acc']:.{digits}f}{tail}"


def loss_cell(loss: float | None, stderr: float | None = None, digits: int = 4) -> str:
    if loss is None or (isinstance(loss, float) and math.isnan(loss)):
        return "n/a"
    tail = f" ± {stderr:.{digits}f}" if stderr is not None and not math.isnan(stderr) else ""
    return f"{loss:.{digits}f}{tail}"


def plot_quality(path: str | Path, series: Sequence[Series], tasks: Sequence[str],
                 refs: Sequence[Reference] = (), *, depth_panel: bool = True) -> Path:
    """One panel per measure against deletion requests: mean served depth (optional, a step curve), each task's
    accuracy (%) and the held-out loss per token, every point with its standard error. Returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ([("depth", "mean served depth (blocks per shard)")] if depth_panel else []) + \
        [(t, f"{t} accuracy (%)") for t in tasks] + [("loss", "held-out Alpaca loss / token")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 3.9), squeeze=False)
    axes = axes[0]
    for s in series:
        style = dict({"marker": "o", "ms": 4, "capsize": 2}, **s.style, label=s.label)
        for ax, (key, _) in zip(axes, panels):
            if key == "depth":
                pts = [p for p in s.points if p.get("depth") is not None]
                ax.step([p["requests"] for p in pts], [p["depth"] for p in pts], where="post",
                        **{k: v for k, v in style.items() if k not in ("marker", "ms", "capsize")})
                continue
            if key == "loss":
                pts = [p for p in s.points if p.get("heldout_loss") is not None]
                ys = [_num(p["heldout_loss"]) for p in pts]
                es = [_num(p.get("heldout_loss_stderr")) for p in pts]
            else:
                pts = [p for p in s.points if (p.get("tasks") or {}).get(key, {}).get("acc") is not None]
                ys = [100 * _num(p["tasks"][key]["acc"]) for p in pts]
                es = [100 * _num(p["tasks"][key].get("acc_stderr")) for p in pts]
            es = [0.0 if math.isnan(e) else e for e in es]
            ax.errorbar([p["requests"] for p in pts], ys, yerr=es, **style)
    for ax, (key, title) in zip(axes, panels):
        for r in refs:
            if key == "depth":
                continue
            if key == "loss":
                y, e = _num(r.heldout_loss), _num(r.heldout_loss_stderr)
            else:
                v = r.tasks.get(key, {})
                y, e = 100 * _num(v.get("acc")), 100 * _num(v.get("acc_stderr"))
            if math.isnan(y):
                continue
            ax.axhline(y, color=r.color, ls=r.ls, label=r.label)
            if not math.isnan(e):
                ax.axhspan(y - e, y + e, color=r.color, alpha=0.12, lw=0)
        ax.set(title=title, xlabel="deletion requests")
        ax.grid(alpha=0.3)
    handles, labels = [], []
    for ax in axes:  # every label once (a reference may be missing from some panels)
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=max(1, len(labels)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.09, 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
