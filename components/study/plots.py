"""The study's figures: training loss per method, and each table as bars with 95% intervals."""

import math
from pathlib import Path
from typing import Dict, List

from components.metric_logs import latest_log, step_metrics
from components.study.report import Cell


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


# A line style and a marker per method (both change from one method to the next), and markers
# at staggered steps, so curves that coincide (LoRA and QLoRA on the tiny model) stay visible
# and tell apart, in grey print too.
LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
# logged by the KnowTuning DPO recipe beside its total loss (DPO + gamma x SFT), which is neither
PREFERENCE_KEY = "loss/dpo"
SFT_TERM_KEY = "loss/sft"


def _style(i: int, n_points: int) -> Dict[str, object]:
    every = max(1, n_points // 8)
    return {"linestyle": LINESTYLES[i % len(LINESTYLES)], "marker": MARKERS[i % len(MARKERS)],
            "markersize": 4.5, "linewidth": 1.2, "markevery": ((i * max(1, every // 3)) % every, every),
            "alpha": 0.85}


def loss_figure(run_dirs: Dict[str, Path]):
    """Training loss per method from torchtune's metric logs. Runs that log a DPO term
    (KnowTuning stage 2) get a panel of their own for it, beside ln 2 (the DPO loss of a policy
    equal to its reference); their SFT term, a cross-entropy like the others, joins the
    supervised runs' panel."""
    plt = _pyplot()
    supervised, preference = [], []  # (label, steps, values)
    for label, run_dir in run_dirs.items():
        try:
            metrics = step_metrics(latest_log(run_dir))
        except FileNotFoundError:
            continue
        steps = sorted(metrics)
        if any(PREFERENCE_KEY in metrics[s] for s in steps):
            preference.append((f"{label}: DPO term", *_series(metrics, PREFERENCE_KEY)))
            if any(SFT_TERM_KEY in metrics[s] for s in steps):
                supervised.append((f"{label}: SFT term (chosen answers)", *_series(metrics, SFT_TERM_KEY)))
        elif any("loss" in metrics[s] for s in steps):
            supervised.append((label, *_series(metrics, "loss")))
    panels = 2 if preference else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4), squeeze=False)
    ax = axes[0][0]
    for i, (label, steps, values) in enumerate(supervised):
        ax.plot(steps, values, label=label, **_style(i, len(steps)))
    ax.set_title("Supervised fine-tuning: training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    if supervised:
        ax.legend(fontsize=8)
    if preference:
        ax = axes[0][1]
        for i, (label, steps, values) in enumerate(preference):
            ax.plot(steps, values, label=label, **_style(i, len(steps)))
        ax.axhline(math.log(2), color="grey", linestyle=":", linewidth=1, label="ln 2 (policy = reference)")
        ax.set_title("Preference training (KnowTuning stage 2): DPO loss")
        ax.set_xlabel("step")
        ax.set_ylabel("DPO loss")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _series(metrics: Dict[int, Dict[str, float]], key: str):
    steps = [s for s in sorted(metrics) if key in metrics[s]]
    return steps, [metrics[s][key] for s in steps]


def plot_losses(run_dirs: Dict[str, Path], out: Path) -> Path:
    """Write `loss_figure` to ``out``."""
    fig = loss_figure(run_dirs)
    fig.savefig(out, dpi=120)
    _pyplot().close(fig)
    return out


def plot_table(cells: List[Cell], title: str, out: Path) -> Path:
    """Grouped bars (one group per task/metric, one bar per method) with 95% interval whiskers."""
    plt = _pyplot()
    cells = [c for c in cells if c.value is not None]
    groups = list(dict.fromkeys((c.task, c.metric) for c in cells))
    methods = list(dict.fromkeys(c.method for c in cells))
    index = {(c.method, c.task, c.metric): c for c in cells}
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
    for i, method in enumerate(methods):
        xs, heights, whiskers = [], [], [[], []]
        for g, key in enumerate(groups):
            cell = index.get((method, *key))
            if cell is None:
                continue
            xs.append(g + i * width)
            heights.append(cell.value)
            whiskers[0].append(cell.value - cell.ci95_low)
            whiskers[1].append(cell.ci95_high - cell.value)
        ax.bar(xs, heights, width, yerr=whiskers, capsize=3, label=method)
    ax.set_xticks([g + width * (len(methods) - 1) / 2 for g in range(len(groups))])
    ax.set_xticklabels([f"{t}\n{m}" for t, m in groups], fontsize=8)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
