"""Plots of one evaluation run (matplotlib, Agg backend: no display needed).

* ``recall_per_hop.png``: Recall@1 per hop ([RQ] i, or "link" for entity linking), free generation
  next to teacher-forced — the gap is what the model's own decoding loses;
* ``top1_scores.png``: histogram of the top-1 retrieval score, hits (top-1 = gold) against misses —
  how separable the model's embedding space is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def recall_per_hop(free: dict[str, float | None], tf: dict[str, float | None], path: Path, title: str) -> Path | None:
    """Grouped bars: one group per hop label, bars free / teacher-forced. None values are not drawn."""
    labels = list(dict.fromkeys(list(free) + list(tf)))
    if not labels or all(v is None for v in list(free.values()) + list(tf.values())):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(labels) + 2), 3.6))
    width = 0.38
    for j, (name, vals, color) in enumerate((("free generation", free, "#4C72B0"), ("teacher-forced", tf, "#DD8452"))):
        xs = [i + (j - 0.5) * width for i, lab in enumerate(labels) if vals.get(lab) is not None]
        ys = [vals[lab] for lab in labels if vals.get(lab) is not None]
        if xs:
            bars = ax.bar(xs, ys, width, label=name, color=color)
            ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("Recall@1 (by gold doc id)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def score_histogram(hit_scores: Sequence[float], miss_scores: Sequence[float], path: Path, title: str) -> Path | None:
    if not hit_scores and not miss_scores:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    allv = list(hit_scores) + list(miss_scores)
    lo, hi = min(allv), max(allv)
    bins = 20 if hi > lo else 1
    rng = (lo, hi) if hi > lo else (lo - 0.5, lo + 0.5)
    if hit_scores:
        ax.hist(hit_scores, bins=bins, range=rng, alpha=0.65, label=f"top-1 = gold ({len(hit_scores)})", color="#55A868")
    if miss_scores:
        ax.hist(miss_scores, bins=bins, range=rng, alpha=0.65, label=f"top-1 wrong ({len(miss_scores)})", color="#C44E52")
    ax.set_xlabel("top-1 score")
    ax.set_ylabel("retrievals")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def grouped_bars(groups: Sequence[str], series: dict[str, Sequence[float | None]], path: Path, title: str,
                 ylabel: str, side: dict[str, float | None] | None = None, side_label: str = "") -> Path:
    """One group per metric, one bar per series (run); optional second panel with one value per series."""
    plt = _plt()
    n = max(len(series), 1)
    panels = 2 if side else 1
    fig, axes = plt.subplots(1, panels, figsize=(max(7.0, len(groups) * (1 + n / 8)) + (3.5 if side else 0), 4.4),
                             gridspec_kw={"width_ratios": [3, 1]} if side else None, squeeze=False)
    ax = axes[0][0]
    width = 0.8 / n
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    for j, (name, vals) in enumerate(series.items()):
        xs = [i + (j - (n - 1) / 2) * width for i, v in enumerate(vals) if v is not None]
        ys = [v for v in vals if v is not None]
        bars = ax.bar(xs, ys, width, label=name, color=cmap(j % cmap.N))
        if n <= 8:
            ax.bar_label(bars, fmt="%.2f", fontsize=6, rotation=90 if n > 2 else 0, padding=2)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylim(0, 1.15)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.12), ncol=min(n, 3), frameon=False)
    if side:
        ax2 = axes[0][1]
        names = list(series)
        vals = [side.get(k) or 0.0 for k in names]
        ax2.bar(range(len(names)), vals, color=[cmap(j % cmap.N) for j in range(len(names))])
        ax2.set_xticks(range(len(names)), [str(j + 1) for j in range(len(names))])
        ax2.set_xlabel("run (legend order)")
        ax2.set_title(side_label, fontsize=10)
        ax2.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
