"""``benchmark.png``: per QA dataset EM and Recall@1 by method, entity linking against name match,
and the training run's held-out curves — what a reader compares at a glance."""

from __future__ import annotations

from pathlib import Path

import numpy as np

BARS = [("em", "EM"), ("recall_at_1_tf", "R@1 teacher-forced"), ("recall_at_1_free", "R@1 free")]


def plot_benchmark(path: Path, rag: dict, el: dict, curve: list[dict]) -> Path | None:
    # heavy (matplotlib): imported where the figure is drawn, with its Agg backend set first
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: as above

    panels = len(rag) + (1 if el else 0) + (1 if curve else 0)
    if panels == 0:
        return None
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.0), squeeze=False)
    axes = list(axes[0])
    for ax, (name, rows) in zip(axes, rag.items()):
        methods = list(rows)
        x = np.arange(len(methods))
        width = 0.8 / len(BARS)
        for i, (key, label) in enumerate(BARS):
            vals = [rows[m]["headline"].get(key) for m in methods]
            ys = [v if v is not None else 0.0 for v in vals]
            err = None
            if key in ("em", "recall_at_1_free"):
                lo = [y - rows[m]["ci"].get(key, [y, y])[0] for m, y in zip(methods, ys)]
                hi = [rows[m]["ci"].get(key, [y, y])[1] - y for m, y in zip(methods, ys)]
                err = [lo, hi]
            ax.bar(x + (i - (len(BARS) - 1) / 2) * width, ys, width, yerr=err, capsize=2, label=label)
        ax.set_xticks(x, methods, rotation=25, ha="right", fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{name} (held-out, n={rows.get('onegen', {}).get('headline', {}).get('n', '?')})", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    k = len(rag)
    if el:
        ax = axes[k]
        names = list(el)
        x = np.arange(len(names))
        for i, (key, label) in enumerate([("el_f1", "micro-F1"), ("el_link_acc_gold", "OneGen, gold mentions"),
                                          ("el_name_match_acc_gold", "name match, gold mentions")]):
            ax.bar(x + (i - 1) * 0.27, [el[n]["headline"].get(key) or 0.0 for n in names], 0.27, label=label)
        ax.set_xticks(x, [f"{n}\n(KB {el[n]['headline'].get('kb_size', '?')})" for n in names], fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.set_title("entity linking", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
        k += 1
    if curve:
        ax = axes[k]
        for key in sorted({k for r in curve for k in r if k.startswith("eval/") and "retrieval_acc" in k}):
            pts = [(r["step"], r[key]) for r in curve if key in r]
            ax.plot(*zip(*pts), marker="o", markersize=3, label=key.split("/")[1] if key.count("/") > 1 else key)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("held-out top-1 retrieval (teacher-forced)")
        twin = ax.twinx()
        pts = [(r["step"], r["loss_gen"]) for r in curve if r.get("loss_gen") is not None]
        if pts:
            twin.plot(*zip(*pts), color="grey", alpha=0.5, linewidth=1, label="loss_gen")
            twin.set_ylabel("loss_gen (nats/token)", fontsize=8)
        ax.set_title("training: held-out curves", fontsize=10)
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
