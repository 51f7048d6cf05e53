"""The study's figures: training loss per method, and each table as bars with 95% intervals."""

from pathlib import Path
from typing import Dict, List

from components.metric_logs import latest_log, read_losses
from components.study.report import Cell


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_losses(run_dirs: Dict[str, Path], out: Path) -> Path:
    """One line per method: loss per step from torchtune's metric log."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, run_dir in run_dirs.items():
        try:
            losses = read_losses(latest_log(run_dir))
        except FileNotFoundError:
            continue
        ax.plot(range(1, len(losses) + 1), losses, label=label, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("Training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
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
