"""Zero-shot sub-models with and without prioritization (paper Appendix A.2, Fig. 5a).

A trained global model is cut, without any retraining, into sub-models of one
budget: ``raffm_core.cut(model, budget, mode="sample", seed=i)`` for ``i``
in ``0..samples-1``. Each spec is taken twice:

* **prioritized**: from the model reordered by salience (what ``cut`` does
  first, function-preserving), so the spec keeps the most salient heads and
  neurons;
* **unprioritized**: from the same model in a random unit order (a seeded,
  function-preserving permutation of every layer's heads and FFN neurons,
  one per sample), which is what a prefix means when nobody ranks units.

A random order, not the model's stored order, is the baseline because a
model trained by RaFFM is stored in the salience order of its last round, so
its stored order is already (almost) prioritized. For a model trained
without prioritization, ``--without stored`` uses the order as stored
(the pretrained order).

Both sets are scored on the run's held-out split (the same split, read from
the run's ``run-config.json``). Outputs: ``ablation.json`` (every score and
the summary numbers), ``ablation.md`` and the box plot ``ablation.png``.

Usage::

    .venv/bin/python scripts/ablation_zero_shot.py RESULTS_DIR/final-model \\
        [--run-config RESULTS_DIR/run-config.json] [--budget params=0.7] \\
        [--samples 50] [--eval-max-examples 400] [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from raffm_core import ModelLayout, Permutation, cut, describe, permute_state  # noqa: E402
from raffm_core.importance import taylor_importance  # noqa: E402
from raffm_core.prioritize import LayerPermutation  # noqa: E402
from raffm_core.task.config import RunConfig  # noqa: E402
from raffm_core.task.data import DatasetSpec, load_splits  # noqa: E402
from raffm_core.task.encode import encode, make_loader, sort_by_length, take  # noqa: E402
from raffm_core.task.metrics import evaluate_model  # noqa: E402

GROUPS = ("prioritized", "unprioritized")
WITHOUT = ("random", "stored")
SALIENCE = ("weights", "taylor")


@dataclass(frozen=True)
class AblationResult:
    """Scores of the sampled sub-models, per group, and how they were made."""

    metric: str
    budget: str
    without: str
    scores: dict[str, list[float]]
    params_fractions: list[float]
    full_model_score: float
    examples: int
    seconds: float
    salience: str = "weights"

    def stats(self) -> dict[str, dict[str, float]]:
        """Median, quartiles, min, max and mean of each group."""
        out = {}
        for group, values in self.scores.items():
            v = np.asarray(values)
            q1, median, q3 = np.percentile(v, [25, 50, 75])
            out[group] = {
                "n": int(v.size),
                "median": float(median),
                "q1": float(q1),
                "q3": float(q3),
                "min": float(v.min()),
                "max": float(v.max()),
                "mean": float(v.mean()),
            }
        return out

    def to_dict(self) -> dict:
        return {
            "metric": self.metric,
            "budget": self.budget,
            "without": self.without,
            "salience": self.salience,
            "samples": len(self.params_fractions),
            "held-out-examples": self.examples,
            "full-model": self.full_model_score,
            "mean-params-fraction": float(np.mean(self.params_fractions)),
            "stats": self.stats(),
            "scores": self.scores,
            "params-fractions": self.params_fractions,
            "seconds": self.seconds,
        }


def shuffled(model: transformers.PreTrainedModel, seed: int) -> transformers.PreTrainedModel:
    """A copy of ``model``, its units in the seeded order of :func:`random_permutation`."""
    copied = copy.deepcopy(model)
    layout = describe(copied)
    permute_state(copied.state_dict(), layout, random_permutation(layout, seed))  # in place
    return copied


def random_permutation(layout: ModelLayout, seed: int) -> Permutation:
    """A seeded random order of every layer's head groups and FFN neurons."""
    g = torch.Generator().manual_seed(seed)
    return Permutation(
        tuple(
            LayerPermutation(
                heads=torch.randperm(layout.num_groups, generator=g),
                ffn=torch.randperm(layout.ffn_size, generator=g),
                query_key=None,
            )
            for _ in range(layout.num_layers)
        )
    )


def run_ablation(
    model_dir: Path,
    cfg: RunConfig,
    budget: str,
    samples: int,
    max_examples: int,
    without: str = "random",
    batch_size: int = 64,
    log=print,
    salience: str = "weights",
    salience_examples: int = 256,
) -> AblationResult:
    """Score ``samples`` sub-models of ``budget``, prioritized and not.

    Parameters
    ----------
    model_dir : Path
        A trained global model in HF format (``final-model/`` of a run).
    cfg : RunConfig
        The run's config: which dataset, split and seed give the held-out examples.
    budget : str
        A :class:`raffm_core.Budget` string, e.g. ``"params=0.7"``.
    samples : int
        Sub-models to draw (>= 1); the paper uses 50 or more.
    max_examples : int
        Held-out examples to score on (0: all).
    without : {"random", "stored"}
        The unit order of the unprioritized group.
    salience : {"weights", "taylor"}
        What "prioritized" ranks by: the weight norm RaFFM uses (the run's
        ``salience-norm``), or first-order Taylor importance
        (:func:`raffm_core.importance.taylor_importance`) measured on up to
        ``salience_examples`` examples of the run's validation split (carved
        from the training data; never the held-out examples scored here).
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if without not in WITHOUT:
        raise ValueError(f"without must be one of {WITHOUT}, got {without!r}")
    started = time.monotonic()
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    splits = load_splits(DatasetSpec.from_run_config(cfg))
    held_out = sort_by_length(
        encode(take(splits.test, max_examples, cfg.seed), tokenizer, cfg.max_length)
    )
    loader = make_loader(held_out, tokenizer, batch_size)
    task, metric = splits.task, splits.task.primary_metric
    layout = describe(model)
    unit_scores = None
    if salience == "taylor":
        if splits.validation is None:
            raise ValueError(
                "salience 'taylor' needs the run's validation split (validation-fraction > 0)"
            )
        picked = encode(
            take(splits.validation, salience_examples, cfg.seed), tokenizer, cfg.max_length
        )
        unit_scores = taylor_importance(model, make_loader(picked, tokenizer, 32))
        log(f"taylor importance on {len(picked)} validation examples")
    elif salience != "weights":
        raise ValueError(f"salience must be one of {SALIENCE}, got {salience!r}")
    full_score = evaluate_model(model, loader, task)[metric]
    log(f"full model: {metric} {full_score:.4f} on {len(held_out)} held-out examples")

    def score(sub: transformers.PreTrainedModel) -> float:
        return evaluate_model(sub, loader, task)[metric]

    scores: dict[str, list[float]] = {g: [] for g in GROUPS}
    fractions = []
    for i in range(samples):
        prioritized = cut(
            model, budget, salience=cfg.weight_norm, scores=unit_scores, mode="sample", seed=i
        )
        spec = prioritized.spec  # the same widths for both groups, in their own unit order
        fractions.append(layout.count_params(spec) / layout.total_params)
        scores["prioritized"].append(score(prioritized.model))
        unordered = shuffled(model, seed=i) if without == "random" else model
        scores["unprioritized"].append(score(cut(unordered, spec, salience=None).model))
        log(
            f"sub-model {i + 1}/{samples}: {fractions[-1]:.3f} of the parameters, "
            f"{metric} {scores['prioritized'][-1]:.4f} prioritized, "
            f"{scores['unprioritized'][-1]:.4f} unprioritized"
        )
    return AblationResult(
        metric,
        budget,
        without,
        scores,
        fractions,
        full_score,
        len(held_out),
        time.monotonic() - started,
        salience,
    )


def markdown_table(result: AblationResult) -> str:
    """The box plot's numbers as a Markdown table."""
    stats = result.stats()
    lines = [
        f"Zero-shot sub-models at budget `{result.budget}` "
        f"(mean parameter fraction {np.mean(result.params_fractions):.3f}), "
        f"{len(result.params_fractions)} samples, {result.metric} on "
        f"{result.examples} held-out examples; the full model scores "
        f"{result.full_model_score:.4f}. Prioritized by {result.salience}; "
        f"unprioritized = {result.without} unit order.",
        "",
        "| sub-models | n | median | q1 | q3 | min | max | mean |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for group in GROUPS:
        s = stats[group]
        lines.append(
            f"| {group} | {s['n']} | {s['median']:.4f} | {s['q1']:.4f} | {s['q3']:.4f} "
            f"| {s['min']:.4f} | {s['max']:.4f} | {s['mean']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def write_outputs(result: AblationResult, out: Path) -> None:
    """``ablation.json``, ``ablation.md`` and the box plot ``ablation.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    (out / "ablation.md").write_text(markdown_table(result))
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.boxplot([result.scores[g] for g in GROUPS], tick_labels=list(GROUPS))
    for i, group in enumerate(GROUPS, start=1):
        jitter = np.random.default_rng(i).uniform(-0.08, 0.08, len(result.scores[group]))
        ax.scatter(i + jitter, result.scores[group], s=8, alpha=0.5, color="tab:blue")
    ax.axhline(result.full_model_score, color="tab:red", linestyle="--", label="full model")
    ax.set_ylabel(f"held-out {result.metric}")
    ax.set_title(f"Zero-shot sub-models at {result.budget}")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "ablation.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="trained model folder (a run's final-model/)")
    parser.add_argument(
        "--run-config",
        type=Path,
        help="the run's run-config.json (default: next to the model folder)",
    )
    parser.add_argument("--budget", default="params=0.7")
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--eval-max-examples", type=int, default=400)
    parser.add_argument("--without", choices=WITHOUT, default="random")
    parser.add_argument(
        "--salience",
        choices=SALIENCE,
        default="weights",
        help="rank by weight norm (RaFFM) or by Taylor importance on the validation split",
    )
    parser.add_argument("--salience-examples", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="output folder (default: next to the model)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    run_config = args.run_config or args.model.parent / "run-config.json"
    if not run_config.is_file():
        parser.error(f"no run config at {run_config}; pass --run-config")
    cfg = RunConfig.from_mapping(json.loads(run_config.read_text()))
    result = run_ablation(
        args.model,
        cfg,
        args.budget,
        args.samples,
        args.eval_max_examples,
        args.without,
        salience=args.salience,
        salience_examples=args.salience_examples,
    )
    out = args.out or args.model.parent / "ablation"
    write_outputs(result, out)
    print(markdown_table(result))
    print(f"written to {out} in {result.seconds:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
