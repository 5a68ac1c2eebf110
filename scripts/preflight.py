"""Check a run's config, data, model and budgets before a federation starts; fail in seconds.

``scripts/run_local.sh`` (so ``make run``) and ``scripts/tls/run.sh`` call
this first. It reads ``[tool.flwr.app.config]`` from ``pyproject.toml``,
applies the overrides (``key=value`` as ``flwr run --run-config`` takes them;
a string value may come without its TOML quotes, as ``make run
ARGS='strategy="fedrolex"'`` delivers it after make and the shell strip
them), and then checks, in order, what would otherwise fail only after the
SuperLink and Ray are up (35-65 s):

* every key and value of the run config (:class:`raffm_core.task.config.RunConfig`);
* the model source: an ``embedded:`` name, ``vit-tiny:``, a local folder, or
  a hub name in the local HF cache; an architecture of a supported family
  that runs the task (:func:`raffm_core.task.support.check_task`);
* the dataset: reachable, the columns present, at least two classes, no
  missing labels; and at least one example per node; with ``--nodes`` (a
  simulation's ``num-supernodes``), that the partitioner can draw that many
  partitions (a Dirichlet draw of 1,000 nodes can fail) and none is empty;
* the budget profile: every tier parses, and at least one tier can hold the
  smallest sub-network.

On success it prints the normalized ``--run-config`` string on stdout (one
line) and exits 0. On a mistake it prints one line, ``preflight: <what is
wrong>``, on stderr and exits 2; with ``--verbose`` the traceback follows.

Usage::

    .venv/bin/python scripts/preflight.py [--nodes N] ['key=value' ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import tomllib
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from raffm_core.errors import ConfigError  # noqa: E402
from raffm_core.task.config import parse_overrides  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class PreflightError(Exception):
    """A mistake in the run's settings, data or model, said in one line."""


def to_run_config(mapping: dict[str, Any]) -> str:
    """The ``--run-config`` string of ``mapping`` (TOML values, space-separated)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return repr(v)

    return " ".join(f"{k}={value(v)}" for k, v in mapping.items())


def check(overrides: dict[str, Any], nodes: int | None) -> dict[str, Any]:
    """Everything the module docstring lists; returns the overrides to pass on."""
    import datasets

    from client_app.partition import check_partition, draw_partitions, process_task
    from raffm_core import BudgetError, RaffmError, TrainingProfile, check_budgets, describe
    from raffm_core.families import attention_materialized
    from raffm_core.task.config import RunConfig
    from raffm_core.task.models import load_model_config

    datasets.disable_progress_bars()
    defaults = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    try:
        cfg = RunConfig.from_mapping(overrides, defaults)
    except RaffmError as err:
        raise PreflightError(str(err)) from err

    # the model: its source and its family, from the config alone (no weights)
    try:
        config = load_model_config(cfg.model_name)
    except RaffmError as err:
        raise PreflightError(str(err)) from err
    import torch
    import transformers

    from raffm_core.families import find_family
    from raffm_core.task.support import check_task

    try:
        find_family(config.model_type)
    except RaffmError as err:
        raise PreflightError(f"model-name = {cfg.model_name!r}: {err}") from err
    try:  # a task the family cannot do, before any data is read
        check_task(cfg.model_name, config.model_type, cfg.task)
    except RaffmError as err:
        raise PreflightError(str(err)) from err

    # the data: splits, columns, labels, examples per node
    try:
        task = process_task(cfg)  # cached: the partition draw below reuses it
    except RaffmError as err:
        raise PreflightError(f"dataset = {cfg.dataset!r}: {err}") from err
    total = nodes or cfg.min_available_nodes
    if len(task.splits.train) < total:
        raise PreflightError(
            f"dataset = {cfg.dataset!r}: {len(task.splits.train)} training examples for "
            f"{total} nodes; every node needs at least one"
        )
    if nodes:  # simulation: the nodes' partitions are known (deployed nodes bring their own)
        try:
            draw_partitions(cfg, nodes)
            for pid in range(nodes):
                check_partition(cfg, pid, nodes)
        except RaffmError as err:
            raise PreflightError(f"{nodes} nodes (num-supernodes): {err}") from err

    # the budgets: every tier parses; one at least holds the smallest sub-network
    config.num_labels = max(task.info.num_labels, 1)
    auto = {"vit": transformers.AutoModelForImageClassification}.get(
        config.model_type, transformers.AutoModelForSequenceClassification
    )
    if task.info.kind == "causal-lm":
        auto = transformers.AutoModelForCausalLM
    if task.info.kind == "extractive-qa":  # start and end logits
        auto, config.num_labels = transformers.AutoModelForQuestionAnswering, 2
    if task.info.kind == "seq2seq":
        auto = transformers.AutoModelForSeq2SeqLM
    with torch.device("meta"):
        skeleton = auto.from_config(config)
    layout = describe(skeleton)
    profile = TrainingProfile(
        batch_size=cfg.batch_size,
        seq_len=task.tokens_per_example(cfg.max_length),
        eager_attention=attention_materialized(skeleton.config),
        margin=cfg.memory_margin,
    )
    try:
        rows = 1 if cfg.trims_vocab and layout.vocab_key is not None else None  # see server_app
        check_budgets(layout, cfg.budget_tiers, profile, vocab=rows)
    except BudgetError as err:
        raise PreflightError(f"budget-profile = {cfg.budget_profile!r}: {err}") from err
    return overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="run-config key=value items")
    parser.add_argument("--nodes", type=int, help="number of nodes (default min-available-nodes)")
    parser.add_argument("--verbose", action="store_true", help="print the traceback too")
    args = parser.parse_args(argv)
    try:
        overrides = parse_overrides(args.overrides)
        check(overrides, args.nodes)
    except Exception as err:  # noqa: BLE001 - anything unforeseen is one line too
        known = isinstance(err, PreflightError | ConfigError)  # a bad override is a ConfigError
        what = str(err) if known else f"{type(err).__name__}: {err}"
        print("preflight: " + " ".join(what.split()), file=sys.stderr)  # one line
        if args.verbose:
            traceback.print_exc()
        return 2
    print(to_run_config(overrides))
    return 0


if __name__ == "__main__":
    sys.exit(main())
