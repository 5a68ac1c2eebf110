"""The RaFFM ServerApp: read the run config, build model and strategy, run, write outputs."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from logging import INFO
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from raffm_core import (
    BudgetError,
    ServerOptimizer,
    TrainingProfile,
    base_config,
    check_budgets,
    describe,
    label_keys,
)
from raffm_core.families import attention_materialized
from raffm_core.task import load_task
from raffm_core.task.config import RunConfig
from raffm_core.task.data import TaskInfo
from raffm_core.task.encode import make_loader, sort_by_length, take
from raffm_core.task.keys import (
    BATCH_SIZE,
    LOCAL_EPOCHS,
    LOCAL_STEPS,
    LR,
    MASKED_LOSS,
    MAX_LENGTH,
    MIXED_PRECISION,
    NESTED_DROPOUT,
    SEED,
    WEIGHT_DECAY,
    WIDTH_SCALER,
)
from raffm_core.task.metrics import evaluate_model
from raffm_core.task.models import Preprocessor

from .baselines import strategy_class, strategy_options
from .checkpoint import Checkpointer, RoundOffset, checkpoint_path
from .loop import NothingToTrain
from .lora import LoraGlobalModel, RaFFMLoRA, lora_settings
from .outputs import (
    VALIDATION_PREFIX,
    prepare_results_dir,
    save_model,
    write_json,
    write_outputs,
    write_status,
)
from .tiers import score_tiers

datasets.disable_progress_bars()
transformers.utils.logging.disable_progress_bar()


def build_strategy(
    cfg: RunConfig,
    model: transformers.PreTrainedModel,
    lora: LoraGlobalModel | None = None,
    seq_len: int | None = None,
) -> Strategy:
    """The strategy named by ``strategy`` (:mod:`server_app.baselines`); with ``lora``, LoRA."""
    optimizer = ServerOptimizer(
        cfg.server_update,
        lr=cfg.server_lr,
        beta1=cfg.server_beta1,
        beta2=cfg.server_beta2,
        tau=cfg.server_tau,
    )
    profile = TrainingProfile(
        batch_size=cfg.batch_size,
        seq_len=seq_len or cfg.max_length,
        eager_attention=attention_materialized(model.config),
        margin=cfg.memory_margin,
        trainable_params=None if lora is None else sum(v.numel() for v in lora.state().values()),
    )
    if lora is None:
        cls, first = strategy_class(cfg.strategy), describe(model)
    else:
        cls, first = RaFFMLoRA, lora
    trim_vocab = cfg.trims_vocab and first.vocab_key is not None
    if cfg.trims_vocab and not trim_vocab:
        log(
            INFO,
            "vocab-trim: the %s keeps its whole vocabulary (its family has no input-only "
            "token embedding to trim)",
            first.model_class,
        )
    return cls(
        first,
        base_config(model).to_json_string(),
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=cfg.min_train_nodes,
        min_evaluate_nodes=cfg.min_evaluate_nodes,
        min_available_nodes=cfg.min_available_nodes,
        min_replies=cfg.min_replies,
        selection_mode=cfg.selection_mode,
        salience_norm=cfg.salience,
        server_optimizer=optimizer,
        proximal_mu=cfg.proximal_mu,
        profile=profile,
        seed=cfg.seed,
        query_timeout=cfg.query_timeout_s,
        max_num_examples=cfg.max_num_examples,
        width_weight_power=cfg.width_weight_power,
        trim_vocab=trim_vocab,
        label_keys=label_keys(model) if cfg.masked_loss else (),
        **strategy_options(cfg),
    )


class CentralEvaluator:
    """``evaluate_fn`` of the strategy: score the global model on the held-out split.

    With a ``validation`` loader it scores that split too (metrics prefixed
    ``val-``) and picks the best round on it, never on the test split. It
    keeps the best global model's weights (by the task's primary metric; the
    earliest round on ties). It scores rounds 0, every ``every``-th round
    and ``last_round``, and returns ``None`` for the others. Given
    ``rounds_dir``, it saves each scored round's
    global model there as ``round-N/`` (``save-round-models``). ``load`` puts
    the arrays' state into ``model`` (default: a strict ``load_state_dict``;
    under LoRA, :meth:`LoraGlobalModel.load`), and ``export`` gives the model
    to save (default ``model``).
    """

    def __init__(
        self,
        model: transformers.PreTrainedModel,
        loader: torch.utils.data.DataLoader,
        task: TaskInfo,
        tokenizer: Preprocessor,
        rounds_dir: Path | None = None,
        load: Callable[[dict[str, torch.Tensor]], Any] | None = None,
        export: Callable[[], transformers.PreTrainedModel] | None = None,
        validation: torch.utils.data.DataLoader | None = None,
        every: int = 1,
        last_round: int = 0,
    ) -> None:
        self.model = model
        self.validation = validation
        self.every = every
        self.last_round = last_round
        self.load = load or (lambda state: model.load_state_dict(state, strict=True))
        self.export = export or (lambda: model)
        self.loader = loader
        self.task = task
        self.tokenizer = tokenizer
        self.rounds_dir = rounds_dir
        self.best_round: int | None = None
        self.best_score = float("-inf")
        self.best_state: dict[str, torch.Tensor] | None = None

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round % self.every and server_round != self.last_round:
            return None
        state = arrays.to_torch_state_dict()
        self.load(state)
        metrics = evaluate_model(self.model, self.loader, self.task, self.tokenizer)
        score = metrics[self.task.primary_metric]
        if self.validation is not None:
            scores = evaluate_model(self.model, self.validation, self.task, self.tokenizer)
            metrics.update({f"{VALIDATION_PREFIX}{k}": v for k, v in scores.items()})
            score = scores[self.task.primary_metric]
        if score > self.best_score:
            self.best_round, self.best_score = server_round, score
            self.best_state = {k: v.detach().clone() for k, v in state.items()}
        if self.rounds_dir is not None:
            save_model(self.export(), self.tokenizer, self.rounds_dir / f"round-{server_round}")
        return MetricRecord(metrics)


def run(grid: Grid, cfg: RunConfig) -> dict[str, Any]:
    """Run the federation described by ``cfg``; returns the summary.

    The results directory gets ``status.json``: ``{"status": "completed"}``,
    or ``"failed"`` with the error, which is then raised again.

    Raises
    ------
    NothingToTrain
        If the run could not change the model: every budget of the server's
        ``budget-profile`` below the smallest sub-network, fewer training
        examples than ``min-available-nodes``, every node skipped, or no reply
        accepted in any round.
    """
    started = time.monotonic()
    out = prepare_results_dir(cfg.results_dir)
    log(INFO, "results directory: %s", out)
    try:
        summary = _federate(grid, cfg, out, started)
    except BaseException as err:
        write_status(out, err)
        raise
    write_status(out, None)
    return summary


def _federate(grid: Grid, cfg: RunConfig, out: Path, started: float) -> dict[str, Any]:
    task = load_task(cfg)
    splits, tokenizer = task.splits, task.preprocessor
    if len(splits.train) < cfg.min_available_nodes:
        raise NothingToTrain(
            f"dataset {cfg.dataset!r} has {len(splits.train)} training examples for "
            f"min-available-nodes = {cfg.min_available_nodes} nodes (partitions); every "
            "partition needs at least one"
        )
    model = task.load_model(cfg.seed)
    lora = None
    if cfg.peft == "lora":
        lora = LoraGlobalModel(model, lora_settings(cfg), cfg.salience, cfg.seed)
        log(
            INFO,
            "LoRA: rank %d on %s, %d adapter parameters; the base stays frozen on the nodes",
            lora.settings.rank,
            ",".join(lora.settings.target_modules),
            lora.count_adapters(),
        )
    scored = take(splits.test, cfg.eval_max_examples, cfg.seed)
    held_out = sort_by_length(task.encode(scored, cfg.max_length))
    validation = None
    if splits.validation is not None:
        picked = take(splits.validation, cfg.eval_max_examples, cfg.seed)
        validation = sort_by_length(task.encode(picked, cfg.max_length))
    log(
        INFO,
        "data: %d train / %d validation / %d held-out examples (%d scored centrally), task %s %s",
        len(splits.train),
        0 if splits.validation is None else len(splits.validation),
        len(splits.test),
        len(scored),  # examples: a question of extractive QA may have several windows
        splits.task.kind,
        list(splits.task.label_names),
    )
    evaluator = CentralEvaluator(
        model,
        make_loader(held_out, tokenizer, cfg.eval_batch_size),
        splits.task,
        tokenizer,
        out / "round-models" if cfg.save_round_models else None,
        load=lora.load if lora else None,
        export=lora.merged if lora else None,
        validation=None
        if validation is None
        else make_loader(validation, tokenizer, cfg.eval_batch_size),
        every=cfg.eval_every,
        last_round=cfg.num_server_rounds,
    )
    strategy = build_strategy(cfg, model, lora, task.tokens_per_example(cfg.max_length))
    # The simulated nodes' budgets (a deployed node's own budget is checked when it
    # answers); fedavg-train-all trains every node whatever its budget.
    if not getattr(strategy, "train_all", False):
        # Under vocab-trim a node's rows are known only once it answers: check the
        # least it could need (one row) here, and each node's own rows then.
        rows = 1 if getattr(strategy, "trim_vocab", False) else None
        try:
            check_budgets(strategy.layout, cfg.budget_tiers, strategy.profile, vocab=rows)
        except BudgetError as err:
            raise NothingToTrain(f"budget-profile = {cfg.budget_profile!r}: {err}") from err
    initial = ArrayRecord(lora.state() if lora else model.state_dict())
    checkpointer = Checkpointer(cfg, checkpoint_path(cfg, out), strategy, evaluator)
    last_round = 0
    if cfg.resume:
        last_round, initial = checkpointer.restore()
    train_config = ConfigRecord(
        {
            LR: cfg.lr,
            LOCAL_STEPS: cfg.local_steps,
            LOCAL_EPOCHS: cfg.local_epochs,
            BATCH_SIZE: cfg.batch_size,
            MAX_LENGTH: cfg.max_length,
            WEIGHT_DECAY: cfg.weight_decay,
            MASKED_LOSS: cfg.masked_loss,
            WIDTH_SCALER: cfg.width_scaler,
            NESTED_DROPOUT: cfg.nested_dropout,
            SEED: cfg.seed,
            MIXED_PRECISION: cfg.mixed_precision,
            **(lora.instruction_config() if lora else {}),
        }
    )
    evaluate_config = ConfigRecord(
        {
            BATCH_SIZE: cfg.eval_batch_size,
            MAX_LENGTH: cfg.max_length,
            SEED: cfg.seed,
            **(lora.instruction_config() if lora else {}),
        }
    )
    # A resumed run continues after its last complete round (checkpoint.RoundOffset).
    runner = RoundOffset(strategy, last_round) if last_round else strategy
    result = runner.start(
        grid,
        initial,
        cfg.num_server_rounds,
        cfg.round_timeout_s,
        train_config,
        evaluate_config,
        evaluator,
        on_round_end=checkpointer,
    )
    if not any(c.status == "accepted" for e in strategy.history.values() for c in e.clients):
        reasons = [c.reason for e in strategy.history.values() for c in e.clients if c.reason]
        raise NothingToTrain(
            f"no node trained in any of the {cfg.num_server_rounds} rounds: "
            f"{len(reasons)} replies, none accepted"
            + (f" (first: {reasons[0]})" if reasons else "")
        )
    final = result.arrays if len(result.arrays) else initial
    if cfg.save_models:
        evaluator.load(final.to_torch_state_dict())
        save_model(evaluator.export(), tokenizer, out / "final-model")
        if lora is not None:  # the global adapters and head alone, as they travel
            lora.save_state(final.to_torch_state_dict(), out / "final-adapters.safetensors")
        if evaluator.best_state is not None:
            evaluator.load(evaluator.best_state)
            save_model(evaluator.export(), tokenizer, out / "best-model")
    central = {**checkpointer.central, **result.evaluate_metrics_serverapp}
    if cfg.score_tiers and lora is None:
        last = dict(central.get(max(central), {})) if central else {}
        full = {k: v for k, v in last.items() if not k.startswith(VALIDATION_PREFIX)}
        tiers = score_tiers(strategy, final, evaluator.loader, splits.task, tokenizer, full)
        write_json(out / "tiers.json", tiers)
        for tier in tiers:
            log(
                INFO,
                "tier %s: %.2f of the body, %s %.4f",
                tier["budget"],
                tier["body-fraction"],
                splits.task.primary_metric,
                tier[splits.task.primary_metric],
            )
    summary = write_outputs(
        out,
        cfg,
        strategy.history,
        central,
        splits.task.primary_metric,
        initial.count_bytes(),
        time.monotonic() - started,
    )
    fraction, ratio = summary["mean-client-params-fraction"], summary["communication-ratio"]
    if fraction is not None and ratio is not None:
        share = (
            f"{fraction:.2f} of the parameters and "
            f"{ratio:.2f} of full-model traffic per client on average"
        )
    else:
        share = "no node trained in any round"
    log(
        INFO,
        "final %s %s (best %s in round %s), %s, %.1f s",
        splits.task.primary_metric,
        _fmt(summary["final-accuracy"]),
        _fmt(summary["best-accuracy"]),
        summary["best-round"],
        share,
        summary["wall-time-s"],
    )
    log(INFO, "results in %s", out)
    return summary


def build_server_app(defaults: Mapping[str, Any] | None = None) -> ServerApp:
    """The ServerApp; ``defaults`` (kebab-case) replace built-in run-config defaults.

    ``flwr run`` passes the full run config, so ``defaults`` matter only when
    the run config is empty, as under ``flwr.simulation.run_simulation``.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run(grid, RunConfig.from_mapping(context.run_config, defaults))

    return app


app = build_server_app()


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
