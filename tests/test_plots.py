"""Figures: the ``compare`` figure (``evaluation.plots.comparison_figure``) and the training curves
(``pipeline.tracking.plot_curves``), drawn on small fixtures and checked on the rendered pixels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from evaluation.plots import comparison_figure
from pipeline.tracking import curve_panels, plot_curves


def _pixels(path: Path) -> np.ndarray:
    import matplotlib.image as mpimg

    img = mpimg.imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    return img[..., :3]


def _longest_blank_columns(img: np.ndarray) -> int:
    """The widest band of columns with nothing drawn across the middle of the figure (the panels'
    height: the old figure's legend below them spanned its ~380 px gap between the panels)."""
    h = img.shape[0]
    blank = (img[int(0.3 * h):int(0.7 * h)] > 0.98).all(axis=(0, 2))
    best = run = 0
    for b in blank:
        run = run + 1 if b else 0
        best = max(best, run)
    return best


PANELS = [
    {"title": "EM", "values": [0.8, 0.133, None], "cis": [(0.63, 0.93), (0.03, 0.27), None], "unit": "score"},
    {"title": "Recall@1, teacher-forced", "values": [1.0, 0.55, None], "cis": [None, None, None], "unit": "score"},
    {"title": "seconds / question", "values": [3.04, 2.93, 4.70], "cis": [None, None, None], "unit": "s"},
]


def test_comparison_figure_is_tight(tmp_path):
    path = comparison_figure(["onegen\nonegen checkpoint", "pipeline-bm25\ngit checkpoint", "no-retrieval\ngit checkpoint"],
                             ["onegen", "pipeline-bm25", "no-retrieval"], PANELS, tmp_path / "c.png",
                             "quickstart: tiny Llama", "rag_dev · n = 30 held-out questions per method\nerror bars: ...")
    img = _pixels(path)
    h, w = img.shape[:2]
    assert w < 3 * h + 600  # three panels side by side, not a wide strip
    # The old figure left ~380 of 1144 px blank between its panels (33%); the gutters now are a few percent.
    assert _longest_blank_columns(img) < 0.1 * w, _longest_blank_columns(img)


def _run_dir(tmp_path: Path, mode: str, rows: list[dict]) -> Path:
    out = tmp_path / f"train-{mode}"
    out.mkdir()
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "config.yaml").write_text(f"model:\n  source: tiny\n  architecture: llama\n  hidden_size: 32\n  num_layers: 1\n"
                                     f"loss:\n  mode: {mode}\n  ret_loss: infonce\n")
    return out


def _rows(ret: bool) -> list[dict]:
    rows = [{"step": s, "loss": 7 - 0.1 * s + (1.0 if ret else 0), "loss_gen": 7 - 0.1 * s,
             "loss_ret": (1.0 - 0.05 * s) if ret else 0.0, "ret_acc": 0.1 * s if ret else 0.0} for s in range(1, 9)]
    rows += [{"step": 4, "eval/retrieval_acc@500": 0.4}, {"step": 8, "eval/retrieval_acc@500": 0.7}]
    return rows


def test_curve_panels_onegen_and_git():
    panels = curve_panels(_rows(True), "onegen", "infonce")
    assert [p["ylabel"] for p in panels] == ["loss (nats)", "top-1 retrieval accuracy"]
    assert [s[0] for s in panels[0]["series"]] == ["loss_gen: next-token CE (nats/token)", "loss_ret: infonce (nats/query)"]
    acc = {s[0]: (s[1], s[2]) for s in panels[1]["series"]}
    # eval/retrieval_acc@N (a sampled entity KB) is kept, and says what N is
    assert acc["held-out eval split (top-1 of 500 sampled)"] == ((4, 8), (0.4, 0.7))
    assert acc["training batch"][0] == tuple(range(1, 9))
    # git: no retrieval loss, so no retrieval curves (from the config's mode, or from loss_ret == 0)
    for mode in ("git", None):
        git = curve_panels(_rows(False), mode)
        assert len(git) == 1 and [s[0] for s in git[0]["series"]] == ["loss_gen: next-token CE (nats/token)"]
        assert git[0]["ylabel"] == "loss (nats/token)"
    assert [s[0] for s in curve_panels(_rows(True), "rit")[0]["series"]] == ["loss_ret: retrieval (nats/query)"]


def test_plot_curves_draws_one_panel_for_git(tmp_path):
    one = _pixels(plot_curves(_run_dir(tmp_path, "git", _rows(False))))
    two = _pixels(plot_curves(_run_dir(tmp_path, "onegen", _rows(True))))
    assert one.shape[0] == pytest.approx(two.shape[0], rel=0.1)
    assert one.shape[1] < 0.65 * two.shape[1]  # one panel, not two
    assert plot_curves(tmp_path / "empty") is None
