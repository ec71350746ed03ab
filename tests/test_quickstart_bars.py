"""bench/quickstart_bars.py: the front-door bars read from a quickstart's summary.json (the run is too long for CI)."""

from __future__ import annotations

import copy
import importlib.util

from tests.train_fixtures import ROOT

_spec = importlib.util.spec_from_file_location("quickstart_bars", ROOT / "bench" / "quickstart_bars.py")
bars = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bars)


def _summary(**onegen) -> dict:
    row = lambda em, r1, s: {"headline": {"n": 40, "em": em, "recall_at_1_free": r1, "s_per_question": s}}  # noqa: E731
    methods = {"onegen": row(0.9, 1.0, 0.9), "two-pass": row(0.9, 1.0, 1.6), "pipeline-bm25": row(0.15, 0.56, 0.85),
               "pipeline-minilm": row(0.22, 0.56, 0.88), "no-retrieval": row(0.0, None, 0.9)}
    methods["onegen"]["headline"].update(onegen)
    return {"wall_s": 13 * 60, "setup_s": 60, "methods": methods}


def test_every_bar_passes_on_a_run_that_meets_them():
    rows = bars.check(_summary(), {"onegen": ["a", "b"], "two-pass": ["a", "b"]})
    assert all(ok for _, ok, _ in rows), rows


def test_each_bar_can_fail():
    def failed(summary, answers=None):
        return {name for name, ok, _ in bars.check(summary, answers or {"onegen": ["a"], "two-pass": ["a"]}) if not ok}

    assert "OneGen EM >= 0.6" in failed(_summary(em=0.5))
    assert "OneGen EM >= pipeline-minilm + 0.2" in failed(_summary(em=0.4))
    assert "OneGen free Recall@1 >= 0.9" in failed(_summary(recall_at_1_free=0.8))
    assert "two-pass gives OneGen's answers" in failed(_summary(), {"onegen": ["a"], "two-pass": ["b"]})
    slow = _summary()
    slow["wall_s"] = 16 * 60
    assert failed(slow) == {"wall time <= 15 min with set-up"}
    few = copy.deepcopy(_summary())
    few["methods"]["onegen"]["headline"]["n"] = 30
    assert "questions per method >= 40" in failed(few)
