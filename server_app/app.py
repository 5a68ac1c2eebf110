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

from raffm_core import ServerOptimizer, TrainingProfile, base_config, describe
from raffm_core.data import (
    CAUSAL_LM,
    TaskInfo,
    encode_task,
    evaluate_model,
    load_tokenizer,
    make_loader,
    resolve_model_source,
    sort_by_length,
    take,
)
from raffm_core.vit import (
    image_tokens,
    is_image_model,
    load_image_model,
    load_pixel_processor,
    load_run_splits,
    run_dataset_spec,
)
from raffm_core.wire import (
    BATCH_SIZE,
    LOCAL_EPOCHS,
    LOCAL_STEPS,
    LR,
    MAX_LENGTH,
    MIXED_PRECISION,
    SEED,
    WEIGHT_DECAY,
    RunConfig,
)

from .baselines import strategy_class, strategy_options
from .checkpoint import Checkpointer, checkpoint_path
from .lora import LoraGlobalModel, RaFFMLoRA, lora_settings
from .outputs import prepare_results_dir, save_model, write_outputs

datasets.disable_progress_bars()
transformers.utils.logging.disable_progress_bar()


def load_global_model(cfg: RunConfig, task: TaskInfo) -> transformers.PreTrainedModel:
    """The pretrained encoder with a (seeded) head for ``task``, on the server only.

    An image model (:func:`raffm_core.vit.is_image_model`) is loaded by
    :func:`raffm_core.vit.load_image_model`.
    """
    if is_image_model(cfg.model_name):
        return load_image_model(cfg.model_name, task, cfg.seed)
    torch.manual_seed(cfg.seed)
    if task.kind == CAUSAL_LM:  # no new head: the LM head answers
        source = resolve_model_source(cfg.model_name)
        return transformers.AutoModelForCausalLM.from_pretrained(source).eval()
    labels = (
        {}
        if task.kind == "regression"
        else {
            "id2label": dict(enumerate(task.label_names)),
            "label2id": {name: i for i, name in enumerate(task.label_names)},
        }
    )
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        resolve_model_source(cfg.model_name),
        num_labels=task.num_labels,
        problem_type=task.problem_type,
        ignore_mismatched_sizes=True,
        **labels,
    )
    return model.eval()


def build_strategy(
    cfg: RunConfig, model: transformers.PreTrainedModel, lora: LoraGlobalModel | None = None
) -> Strategy:
    """The strategy named by ``strategy`` (:mod:`server_app.baselines`); with ``lora``, LoRA."""
    optimizer = ServerOptimizer(
        cfg.server_update,
        lr=cfg.server_lr,
        beta1=cfg.server_beta1,
        beta2=cfg.server_beta2,
        tau=cfg.server_tau,
    )
    profile = TrainingProfile(batch_size=cfg.batch_size, seq_len=_seq_len(cfg, model))
    if lora is not None:
        profile = TrainingProfile(
            batch_size=cfg.batch_size,
            seq_len=_seq_len(cfg, model),
            trainable_params=sum(v.numel() for v in lora.state().values()),
        )
    if lora is None:
        cls, first = strategy_class(cfg.strategy), describe(model)
    else:
        cls, first = RaFFMLoRA, lora
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
        salience_norm=cfg.salience_norm,
        server_optimizer=optimizer,
        proximal_mu=cfg.proximal_mu,
        profile=profile,
        seed=cfg.seed,
        query_timeout=cfg.query_timeout_s,
        max_num_examples=cfg.max_num_examples,
        **strategy_options(cfg),
    )


class CentralEvaluator:
    """``evaluate_fn`` of the strategy: score the global model on the held-out split.

    It keeps the best global model's weights (by the task's primary metric;
    the earliest round on ties) and, given ``rounds_dir``, saves each round's
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
        tokenizer: transformers.PreTrainedTokenizerBase,
        rounds_dir: Path | None = None,
        load: Callable[[dict[str, torch.Tensor]], Any] | None = None,
        export: Callable[[], transformers.PreTrainedModel] | None = None,
    ) -> None:
        self.model = model
        self.load = load or (lambda state: model.load_state_dict(state, strict=True))
        self.export = export or (lambda: model)
        self.loader = loader
        self.task = task
        self.tokenizer = tokenizer
        self.rounds_dir = rounds_dir
        self.best_round: int | None = None
        self.best_score = float("-inf")
        self.best_state: dict[str, torch.Tensor] | None = None

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        state = arrays.to_torch_state_dict()
        self.load(state)
        metrics = evaluate_model(self.model, self.loader, self.task)
        score = metrics[self.task.primary_metric]
        if score > self.best_score:
            self.best_round, self.best_score = server_round, score
            self.best_state = {k: v.detach().clone() for k, v in state.items()}
        if self.rounds_dir is not None:
            save_model(self.export(), self.tokenizer, self.rounds_dir / f"round-{server_round}")
        return MetricRecord(metrics)


def run(grid: Grid, cfg: RunConfig) -> dict[str, Any]:
    """Run the federation described by ``cfg``; returns the summary."""
    started = time.monotonic()
    out = prepare_results_dir(cfg.results_dir)
    log(INFO, "results directory: %s", out)
    splits = load_run_splits(run_dataset_spec(cfg))
    image = is_image_model(cfg.model_name)
    tokenizer = load_pixel_processor(cfg.model_name) if image else load_tokenizer(cfg.model_name)
    model = load_global_model(cfg, splits.task)
    lora = None
    if cfg.peft == "lora":
        lora = LoraGlobalModel(model, lora_settings(cfg), cfg.salience_norm, cfg.seed)
        log(
            INFO,
            "LoRA: rank %d on %s, %d adapter parameters; the base stays frozen on the nodes",
            lora.settings.rank,
            ",".join(lora.settings.target_modules),
            lora.count_adapters(),
        )
    scored = take(splits.test, cfg.eval_max_examples, cfg.seed)
    held_out = sort_by_length(encode_task(scored, tokenizer, cfg.max_length, splits.task))
    log(
        INFO,
        "data: %d train / %d held-out examples (%d scored centrally), task %s %s",
        len(splits.train),
        len(splits.test),
        len(held_out),
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
    )
    strategy = build_strategy(cfg, model, lora)
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
    result = strategy.start(
        grid,
        initial,
        cfg.num_server_rounds,
        cfg.round_timeout_s,
        train_config,
        evaluate_config,
        evaluator,
        first_round=last_round + 1,
        on_round_end=checkpointer,
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
    summary = write_outputs(
        out,
        cfg,
        strategy.history,
        {**checkpointer.central, **result.evaluate_metrics_serverapp},
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


def _seq_len(cfg: RunConfig, model: transformers.PreTrainedModel) -> int:
    """Tokens per example a training step sees: ``max-length``, or a ViT's patches + 1."""
    return image_tokens(model.config) if is_image_model(cfg.model_name) else cfg.max_length


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
