"""Report plots (matplotlib, Agg backend): accuracy, speed/size ratios, per-block AWQ-vs-RTN losses."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plot_accuracy", "plot_layer_losses", "plot_ratios"]


def plot_accuracy(names: list[str], kl: list[float], agreement: list[float], path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    axes[0].bar(names, kl, color="#c44e52")
    axes[0].set_title("mean KL vs reference (nats, lower is better)")
    axes[1].bar(names, agreement, color="#4c72b0")
    axes[1].set_ylim(min(agreement + [1.0]) * 0.95, 1.0)
    axes[1].set_title("argmax agreement with reference")
    for ax in axes:
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ratios(names: list[str], series: dict[str, list[float]], path: Path, title: str) -> Path:
    """Grouped bars of candidate/reference ratios (1.0 = same as reference)."""
    fig, ax = plt.subplots(figsize=(9, 3.4))
    width = 0.8 / max(len(series), 1)
    for i, (label, values) in enumerate(series.items()):
        xs = [j + i * width for j in range(len(names))]
        ax.bar(xs, [v if v is not None else 0 for v in values], width=width, label=label)
    ax.axhline(1.0, color="k", linewidth=0.8)
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(names))], names, rotation=20)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_layer_losses(rows: list[dict], path: Path, title: str) -> Path:
    """rows: [{"block": str, "group": str, "rtn": float, "awq": float}] -> per-group lines over blocks."""
    groups = sorted({r["group"] for r in rows})
    fig, ax = plt.subplots(figsize=(9, 3.6))
    for g in groups:
        sel = [r for r in rows if r["group"] == g]
        xs = list(range(len(sel)))
        line = ax.plot(xs, [r["rtn"] for r in sel], linestyle="--", marker="o", markersize=3, label=f"{g} RTN")
        ax.plot(xs, [r["awq"] for r in sel], color=line[0].get_color(), marker="s", markersize=3, label=f"{g} AWQ")
    ax.set_yscale("log")
    ax.set_xlabel("block")
    ax.set_ylabel("output MSE")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
