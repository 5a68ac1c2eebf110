"""summary.json: the best round is chosen on validation when there is one, never on test."""

from __future__ import annotations

from server_app.outputs import summarize


def test_best_round_is_chosen_on_validation_and_reported_with_its_test_score():
    central = {
        0: {"accuracy": 0.50, "val-accuracy": 0.50},
        1: {"accuracy": 0.80, "val-accuracy": 0.60},  # best on test, not on validation
        2: {"accuracy": 0.70, "val-accuracy": 0.75},
        3: {"accuracy": 0.72, "val-accuracy": 0.70},
    }
    summary = summarize({}, central, "accuracy", 1, 0.0)
    assert summary["best-round"] == 2 and summary["best-round-chosen-on"] == "validation"
    assert summary["best-accuracy"] == 0.70 and summary["val-best-accuracy"] == 0.75
    assert summary["final-accuracy"] == 0.72


def test_without_validation_the_best_round_is_the_best_test_round():
    central = {0: {"accuracy": 0.5}, 1: {"accuracy": 0.8}, 2: {"accuracy": 0.8}}
    summary = summarize({}, central, "accuracy", 1, 0.0)
    assert (summary["best-round"], summary["best-accuracy"]) == (1, 0.8)  # earliest on ties
    assert summary["best-round-chosen-on"] == "test" and summary["val-best-accuracy"] is None
