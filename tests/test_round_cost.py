"""scripts/round_cost.py: the per-node split of a round, on a hand-made rounds.json."""

from __future__ import annotations

import json

import pytest

from scripts import round_cost


def client(pid, age, handler, train, arrived, status="accepted"):
    return {
        "partition-id": pid,
        "budget": "params=0.5",
        "status": status,
        "process-age-s": age,
        "handler-time-s": handler,
        "train-time-s": train,
        "reply-after-s": arrived,
    }


ROUND = {
    "round": 1,
    "wall-time-s": 20.0,
    "phases-s": {"configure-s": 1.0, "train-wait-s": 15.0, "aggregate-s": 0.5},
    "clients": [
        client(0, 4.0, 9.0, 6.0, arrived=14.0),
        client(1, 3.0, 8.0, 5.0, arrived=12.5),
        client(2, 1, 1, 1, 2, "rejected"),
    ],
}


def test_delivery_and_idle_are_what_start_up_and_handler_leave_of_the_wait():
    deployed = round_cost.client_costs(ROUND, deployment=True)
    assert [c["partition-id"] for c in deployed] == [0, 1]  # rejected replies are left out
    assert [c["delivery-s"] for c in deployed] == pytest.approx([1.0, 1.5])  # 14 - 4 - 9, ...
    assert [c["idle-s"] for c in deployed] == pytest.approx([1.0, 2.5])  # 15 - 14, 15 - 12.5
    simulated = round_cost.client_costs(ROUND, deployment=False)
    assert [c["delivery-s"] for c in simulated] == pytest.approx([5.0, 4.5])  # an actor's age


def test_report_marks_what_older_runs_did_not_record(tmp_path, capsys):
    old = {**ROUND, "phases-s": {}, "clients": [{"budget": "params=1", "status": "accepted"}]}
    (tmp_path / "rounds.json").write_text(json.dumps([{"round": 0}, ROUND, {**old, "round": 2}]))
    assert round_cost.main([str(tmp_path), "--deployment"]) == 0
    out = capsys.readouterr().out
    assert "round 1: 20.0 s (configure 1.0, train-wait 15.0, aggregate 0.5)" in out
    assert "| 0 | params=0.5 | 4.0 | 9.0 | 6.0 | 1.0 | 1.0 |" in out
    assert "round 2: 20.0 s (no phases)" in out and "| - | params=1 | - | - | - | - | - |" in out
    assert "mean over 3 client-rounds: start-up 3.5 s, handler 8.5 s" in out


def test_a_directory_without_rounds_json_is_named(tmp_path):
    with pytest.raises(SystemExit, match="rounds.json: no such file"):
        round_cost.main([str(tmp_path)])
