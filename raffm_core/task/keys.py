"""Every key that travels in a Flower Message, once.

Wire keys are kebab-case strings. Both the ServerApp and the ClientApp import
them from here, so a key cannot be spelled two ways. Nothing here imports
Flower: the records themselves are built in ``server_app`` and ``client_app``.
Run-config keys are the fields of :class:`raffm_core.task.config.RunConfig`.
"""

from __future__ import annotations

# --- Record names in a Message's RecordDict (as Flower's stock strategies) ---
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"

# --- ConfigRecord keys of train and evaluate instructions --------------------
SERVER_ROUND = "server-round"
SPEC = "spec"  # SubnetSpec.to_json()
BASE_CONFIG = "base-config"  # the full model's transformers config, as JSON
LR = "lr"
LOCAL_STEPS = "local-steps"
LOCAL_EPOCHS = "local-epochs"
BATCH_SIZE = "batch-size"
MAX_LENGTH = "max-length"
WEIGHT_DECAY = "weight-decay"
MASKED_LOSS = "masked-loss"  # bool, optional (absent: plain cross-entropy)
WIDTH_SCALER = "width-scaler"  # bool, optional (absent: no scaler)
NESTED_DROPOUT = "nested-dropout"  # float in [0, 1), optional (absent: 0)
RECORD_IMPORTANCE = "record-importance"  # bool, optional: reply with IMPORTANCE
PROXIMAL_MU = "proximal-mu"
SEED = "seed"
MIXED_PRECISION = "mixed-precision"  # "no" or "bf16" (autocast; weights stay fp32)
PEFT = "peft"  # "none" or "lora"; under "lora" also the four keys below
LORA_RANK = "lora-rank"
LORA_ALPHA = "lora-alpha"
LORA_DROPOUT = "lora-dropout"
LORA_TARGET_MODULES = "lora-target-modules"  # comma-separated, resolved by the server

# --- Budget query: the reply's ConfigRecord; BUDGET is also a node-config key
BUDGET = "budget"
VOCAB = "vocab"  # query reply: the token ids of the node's data, as runs ("0-3,17")
BASELINE_MB = "baseline-mb"  # query reply (memory-mb budgets) and train reply metric: see below
PARTITION_ID = "partition-id"  # Flower's own node-config key in simulation
NUM_PARTITIONS = "num-partitions"  # likewise

# --- Train replies: optional records besides ARRAYS and METRICS ------------------
IMPORTANCE = "importance"  # ArrayRecord: "heads.i" and "ffn.i" per layer (Taylor, per example)
LABELS_HELD = "labels-held"  # ConfigRecord CONFIG (masked loss): the class ids of the node's data
TAYLOR = "taylor"  # the salience-norm value that asks for IMPORTANCE

# --- MetricRecord keys of replies ---------------------------------------------
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
TRAIN_TIME_S = "train-time-s"  # the training loop only
HANDLER_TIME_S = "handler-time-s"  # the whole train handler: rebuild, data, training, reply
PROCESS_AGE_S = "process-age-s"  # the process's age when the handler began: start-up in deployment
TRAIN_STEPS = "train-steps"
PEAK_MEMORY_MB = "peak-memory-mb"  # the process's peak RSS while it served the instruction
# BASELINE_MB, in a train reply: the RSS the process held besides the received
# sub-model before training (its libraries, data, tokenizer, earlier work).
LOSS = "loss"
ACCURACY = "accuracy"
F1 = "f1"
EXACT_MATCH = "exact-match"  # extractive QA (with F1), generated answers (instructions, seq2seq)
PEARSON = "pearson"

TRAIN_REPLY_METRICS = (NUM_EXAMPLES, TRAIN_LOSS, TRAIN_TIME_S, TRAIN_STEPS, PEAK_MEMORY_MB)
"""Metrics every train reply carries (the strategy rejects a reply without one)."""
