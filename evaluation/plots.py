"""Plots of evaluation runs (matplotlib, Agg backend: no display needed).

* ``recall_per_hop.png``: Recall@1 per hop ([RQ] i, or "link" for entity linking), free generation
  next to teacher-forced — the gap is what the model's own decoding loses;
* ``top1_scores.png``: histogram of the top-1 retrieval score, hits (top-1 = gold) against misses —
  how separable the model's embedding space is;
* ``comparison_figure``: the ``compare`` PNG (one row per run in the table's order, one panel per
  metric, values written on the bars, bootstrap CIs as error bars).
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

from onegen.methods import METHODS


def _plt():
    # heavy (matplotlib): imported where a figure is drawn, with its Agg backend set first
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: as above

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


# One colour per method, the same in every panel (OneGen blue, its two-pass variant lighter, the
# separate-retriever pipelines warm, no retrieval grey): onegen.methods.
METHOD_COLORS = {m.name: m.color for m in METHODS.values()}


def _value_text(v: float, unit: str) -> str:
    return f"{v:.3f}" if unit == "score" else f"{v:.3f} s" if v < 10 else f"{v:.1f} s"


def _panel(ax, y, values, cis, unit: str, colors: list) -> None:
    """Horizontal bars of one metric, each annotated with its value (and its CI as an error bar)."""
    top = max([v for v in values if v is not None] + [hi for c in cis if c for _, hi in [c]] + [1e-9])
    right = 1.0 if unit == "score" else top
    pad = 0.035 * right
    for yi, v, ci, color in zip(y, values, cis, colors):
        if v is None:
            ax.text(pad, yi, "n/a", va="center", ha="left", fontsize=8, color="#777777", style="italic")
            continue
        ax.barh(yi, v, height=0.62, color=color)
        end = v
        if ci is not None:
            ax.errorbar(v, yi, xerr=[[v - ci[0]], [ci[1] - v]], fmt="none", ecolor="#222222", elinewidth=1, capsize=3)
            end = max(v, ci[1])
        ax.text(end + pad, yi, _value_text(v, unit), va="center", ha="left", fontsize=8)
    ax.set_xlim(0, right * 1.32)
    if unit == "score":
        ax.set_xticks([0, 0.5, 1.0], ["0", "0.5", "1"])
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def comparison_figure(labels: Sequence[str], methods: Sequence[str | None], panels: Sequence[dict], path: Path,
                      title: str, subtitle: str) -> Path:
    """One row per run (top to bottom in the table's order, named on the left), one panel per metric.

    ``panels``: dicts with ``title``, ``values`` (per row, None = not applicable), ``cis`` (per row,
    (low, high) or None) and ``unit`` (``score``: a 0..1 axis; ``s``: seconds)."""
    plt = _plt()
    n_rows, n_panels = len(labels), max(len(panels), 1)
    lines_per_label = max((lab.count("\n") + 1 for lab in labels), default=1)
    fig, axes = plt.subplots(1, n_panels, sharey=True, squeeze=False,
                             figsize=(1.5 + 2.0 * n_panels, 1.45 + (0.36 + 0.12 * lines_per_label) * n_rows))
    fallback = plt.get_cmap("tab10")
    colors = [METHOD_COLORS.get(m or "", fallback(i % 10)) for i, m in enumerate(methods)]
    y = list(range(n_rows))
    for ax, panel in zip(axes[0], panels):
        _panel(ax, y, panel["values"], panel["cis"], panel["unit"], colors)
        ax.set_title(panel["title"], fontsize=9.5)
    first = axes[0][0]
    first.set_yticks(y, labels, fontsize=9)
    first.set_ylim(n_rows - 0.5, -0.5)  # the first row on top, as in the table
    for ax in axes[0][1:]:
        ax.tick_params(axis="y", length=0)
    fig.tight_layout()
    fig.subplots_adjust(wspace=0.12)
    # Title and subtitle above the panels (bbox_inches="tight" keeps them), wrapped to the figure's width.
    width_in, height_in = fig.get_size_inches()
    sub = [part for line in subtitle.splitlines() for part in textwrap.wrap(line, width=int(width_in * 15))]
    fig.text(0.0, 1 + (0.12 + 0.16 * len(sub)) / height_in, title, fontsize=11.5, fontweight="bold", ha="left", va="bottom")
    fig.text(0.0, 1 + 0.08 / height_in, "\n".join(sub), fontsize=8.5, color="#444444", ha="left", va="bottom",
             linespacing=1.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight", pad_inches=0.12)
    plt.close(fig)
    return path
