"""The oracle of the federated runs: the global model changes only inside the slices nodes held.

Shared by the simulation tests of the tasks (``save-round-models`` runs):
outside the union of the accepted nodes' slices, the global model after a
round equals the prioritized global model of the round before, bit for bit.
The oracle re-derives the server's order from the weights (L1), so those
runs set ``salience-norm = "l1"``: a Taylor order comes from the nodes'
gradients (its ranking is tested in tests/test_signal.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from raffm_core import SubnetSpec, describe, permute_state, rank_units
from tests.sim import read_json


def load_round(run_dir: Path, round_: int, model_cls) -> tuple[torch.nn.Module, dict]:
    """The saved global model of ``round_`` and a copy of its state dict."""
    model = model_cls.from_pretrained(Path(run_dir) / "round-models" / f"round-{round_}")
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def assert_changed_only_inside_held_slices(run_dir: Path, model_cls) -> dict[str, int]:
    """Check every round of a run against the oracle; a round must change something.

    Raises ``AssertionError`` if an element outside every held slice changed,
    if nothing changed, or if the slices covered every element (vacuous).
    Returns the last round's uncovered elements per key, for callers that
    check *what* went untouched.
    """
    rounds = read_json(run_dir, "rounds.json")
    model, before = load_round(run_dir, 0, model_cls)
    layout = describe(model)
    for row in rounds[1:]:
        _, after = load_round(run_dir, row["round"], model_cls)
        prioritized = {k: v.clone() for k, v in before.items()}
        permute_state(prioritized, layout, rank_units(prioritized, layout))
        covered = {k: torch.zeros(v.shape, dtype=torch.bool) for k, v in before.items()}
        for client in row["clients"]:
            assert client["status"] == "accepted", client
            spec = SubnetSpec.from_dict(client["spec"])
            slices = layout.slices(spec)  # prefixes, or the index sets of rolling windows
            for key in layout.sub_shapes(spec):
                if key not in slices:
                    covered[key][...] = True  # held whole
                    continue
                axis, index = slices[key]
                covered[key].movedim(axis, 0)[index] = True
        changed = 0
        for key in before:
            assert torch.equal(after[key][~covered[key]], prioritized[key][~covered[key]]), key
            changed += int((after[key] != prioritized[key]).sum())
        assert changed > 0
        uncovered = {k: int((~c).sum()) for k, c in covered.items() if (~c).any()}
        assert uncovered, "every element was covered: the test would be vacuous"
        before = after
    return uncovered
