"""Model families as data.

Each :class:`Family` says, for one transformer architecture, which ``nn.Linear``
modules of a layer share which elastic axis. The algorithms (ranking,
permuting, slicing, aggregating) read only these tables, so supporting a new
architecture means adding an entry to :data:`FAMILIES`, not editing them.

Tensor layouts: a module named here is an ``nn.Linear``, whose ``weight`` is
``(out_features, in_features)``, or, in a family with ``transposed=True``, a
GPT-style ``transformers.pytorch_utils.Conv1D``, whose ``weight`` is
``(in_features, out_features)``. Either way the optional ``bias`` is
``(out_features,)``. A stack's relative position bias (T5) is an
``nn.Embedding`` whose ``weight`` is ``(num_buckets, num_heads)``.

Most families have one stack of layers, described by the flat fields of
:class:`Family`. Encoder-decoder families list their stacks in
:attr:`Family.stacks` instead (:class:`Stack`), each with its attention blocks
per layer (a decoder layer has self- and cross-attention).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import UnsupportedModelError


@dataclass(frozen=True)
class Attention:
    """The projections of one attention block, as paths relative to a layer."""

    query: str
    key: str
    value: str
    out: str


@dataclass(frozen=True)
class Stack:
    """One stack of layers whose elastic modules sit at the same paths.

    Attributes
    ----------
    layers : str
        Path of the ``nn.ModuleList`` of layers, relative to the base model.
    attention : tuple of Attention
        The layer's attention blocks. Their heads share the layer's one head
        axis: head ``h`` of every block moves and is kept together. Each
        block is function-preserving under any head order on its own, so
        coupling them only constrains which orders are chosen.
    ffn_in : tuple of tuple of str
        Alternative sets of FFN input projections; the first set whose modules
        all exist in the layer is used (T5 v1.1's gated ``wi_0``/``wi_1`` or
        the original T5's ``wi``).
    ffn_out : str
        FFN output projection.
    position_bias : str or None
        Path, relative to the stack's first layer, of a relative position bias
        ``nn.Embedding`` of shape ``(num_buckets, num_heads)`` that the first
        layer computes once and passes to every later layer of the stack
        (T5). Column ``h`` is added to head ``h``'s scores in *every* layer,
        so all layers of the stack must share one head order and one kept
        head set, and the columns move with them.
    """

    layers: str
    attention: tuple[Attention, ...]
    ffn_in: tuple[tuple[str, ...], ...]
    ffn_out: str
    position_bias: str | None = None


@dataclass(frozen=True)
class Family:
    """Where the elastic weights of one architecture live.

    Attributes
    ----------
    name : str
        Human-readable family name.
    model_types : tuple of str
        ``config.model_type`` values this entry covers.
    layers : str
        Path of the ``nn.ModuleList`` of transformer layers, relative to the
        base model (``model.base_model``).
    query, key, value : str
        Paths, relative to a layer, of the attention input projections. Their
        output rows are grouped by head.
    attn_out : str
        Path of the attention output projection. Its input columns are grouped
        by head.
    ffn_in : tuple of str
        FFN input projections whose output rows are FFN neurons (``up``, plus
        ``gate`` for gated FFNs).
    ffn_out : str
        FFN output projection whose input columns are FFN neurons.
    heads_attr, kv_heads_attr : str or None
        Config attributes with the number of query heads and of key/value heads
        (``None`` when every head has its own key/value head).
    rotary : bool
        Whether queries and keys are rotated (RoPE). RoPE pairs dimension ``i``
        with ``i + d/2`` and gives each pair its own frequency, so channels
        within a head must not be permuted; whole heads still can be.
    ffn_size_attr : str
        Config attribute with the number of FFN neurons per layer.
    transposed : bool
        Whether the projections are ``Conv1D`` (weight ``(in, out)``, GPT-2)
        rather than ``nn.Linear`` (weight ``(out, in)``).
    fused_qkv : bool
        Whether ``query``, ``key`` and ``value`` name one module whose outputs
        are Q, K and V side by side, each of them grouped by head (GPT-2's
        ``c_attn``, of width ``3 x hidden``). Needs one key/value head per
        query head.
    ffn_size_factor : int or None
        FFN neurons per hidden unit when the config's ``ffn_size_attr`` is
        ``None`` (GPT-2's ``n_inner=None`` means ``4 x n_embd``).
    width_attrs : tuple of str
        Integer attributes of the attention module holding the query width
        (heads x head size), updated on sub-models (BERT's ``all_head_size``,
        GPT-2's ``split_size``, by which it splits the fused output).
    head_dim_attr : str or None
        Config attribute with the channels per head when the config states it
        apart from the hidden size (T5's ``d_kv``); ``None`` reads
        ``head_dim`` if the config has it, else ``hidden / heads``.
    stacks : tuple of Stack
        For models with several stacks (encoder-decoder): every stack, in
        state-dict order. Empty means one stack made of the flat fields
        ``layers`` ... ``ffn_out``, which are then unused otherwise.
    token_embedding : str or None
        Path, relative to the base model, of the input token ``nn.Embedding``
        (weight ``(vocab_size, hidden)``) whose rows a sub-model may trim to
        the tokens a node uses (:attr:`raffm_core.SubnetSpec.vocab`). Only
        where the rows are an input lookup and nothing else: a model that
        ties them to an output layer (a language-model head) scores every
        token with them, so trimming would change its outputs. ``None``: the
        family's vocabulary is not trimmed.
    """

    name: str
    model_types: tuple[str, ...]
    layers: str = ""
    query: str = ""
    key: str = ""
    value: str = ""
    attn_out: str = ""
    ffn_in: tuple[str, ...] = ()
    ffn_out: str = ""
    heads_attr: str = "num_attention_heads"
    kv_heads_attr: str | None = None
    rotary: bool = False
    ffn_size_attr: str = "intermediate_size"
    transposed: bool = False
    fused_qkv: bool = False
    ffn_size_factor: int | None = None
    width_attrs: tuple[str, ...] = ("all_head_size",)
    head_dim_attr: str | None = None
    stacks: tuple[Stack, ...] = ()
    token_embedding: str | None = None

    def layer_stacks(self) -> tuple[Stack, ...]:
        """The family's stacks: :attr:`stacks`, or the one the flat fields describe."""
        if self.stacks:
            return self.stacks
        attention = Attention(self.query, self.key, self.value, self.attn_out)
        return (Stack(self.layers, (attention,), (self.ffn_in,), self.ffn_out),)


def _t5_ffn_in(sub: int) -> tuple[tuple[str, ...], ...]:
    """T5 v1.1 / FLAN-T5 / mT5's gated FFN, or the original T5's, in sub-layer ``sub``."""
    ffn = f"layer.{sub}.DenseReluDense"
    return ((f"{ffn}.wi_0", f"{ffn}.wi_1"), (f"{ffn}.wi",))


FAMILIES: tuple[Family, ...] = (
    Family(
        name="BERT",
        model_types=("bert", "roberta", "xlm-roberta"),
        layers="encoder.layer",
        query="attention.self.query",
        key="attention.self.key",
        value="attention.self.value",
        attn_out="attention.output.dense",
        ffn_in=("intermediate.dense",),
        ffn_out="output.dense",
        heads_attr="num_attention_heads",
        kv_heads_attr=None,
        rotary=False,
        token_embedding="embeddings.word_embeddings",
    ),
    Family(
        name="DistilBERT",
        model_types=("distilbert",),
        layers="transformer.layer",
        query="attention.q_lin",
        key="attention.k_lin",
        value="attention.v_lin",
        attn_out="attention.out_lin",
        ffn_in=("ffn.lin1",),
        ffn_out="ffn.lin2",
        heads_attr="n_heads",
        kv_heads_attr=None,
        rotary=False,
        ffn_size_attr="hidden_dim",
        token_embedding="embeddings.word_embeddings",
    ),
    Family(
        name="ViT",
        model_types=("vit",),
        layers="layers",
        query="attention.q_proj",
        key="attention.k_proj",
        value="attention.v_proj",
        attn_out="attention.o_proj",
        ffn_in=("mlp.fc1",),
        ffn_out="mlp.fc2",
        heads_attr="num_attention_heads",
        kv_heads_attr=None,
        rotary=False,
    ),
    Family(
        name="LLaMA",
        model_types=("llama", "qwen2", "mistral"),
        layers="layers",
        query="self_attn.q_proj",
        key="self_attn.k_proj",
        value="self_attn.v_proj",
        attn_out="self_attn.o_proj",
        ffn_in=("mlp.gate_proj", "mlp.up_proj"),
        ffn_out="mlp.down_proj",
        heads_attr="num_attention_heads",
        kv_heads_attr="num_key_value_heads",
        rotary=True,
    ),
    Family(
        name="GPT-2",
        model_types=("gpt2",),  # GPT-2 and DistilGPT2
        layers="h",
        query="attn.c_attn",
        key="attn.c_attn",
        value="attn.c_attn",
        attn_out="attn.c_proj",
        ffn_in=("mlp.c_fc",),
        ffn_out="mlp.c_proj",
        heads_attr="n_head",
        kv_heads_attr=None,
        rotary=False,
        ffn_size_attr="n_inner",
        transposed=True,
        fused_qkv=True,
        ffn_size_factor=4,
        width_attrs=("split_size",),
    ),
    Family(
        name="T5",
        model_types=("t5", "mt5"),  # T5, T5 v1.1, FLAN-T5 (model_type "t5"), mT5
        heads_attr="num_heads",
        ffn_size_attr="d_ff",
        head_dim_attr="d_kv",  # heads x d_kv need not equal d_model
        width_attrs=("inner_dim",),  # T5Attention reshapes its output by inner_dim
        stacks=(
            Stack(
                layers="encoder.block",
                attention=(Attention(*(f"layer.0.SelfAttention.{m}" for m in "qkvo")),),
                ffn_in=_t5_ffn_in(1),
                ffn_out="layer.1.DenseReluDense.wo",
                position_bias="layer.0.SelfAttention.relative_attention_bias",
            ),
            Stack(
                layers="decoder.block",
                attention=(
                    Attention(*(f"layer.0.SelfAttention.{m}" for m in "qkvo")),
                    Attention(*(f"layer.1.EncDecAttention.{m}" for m in "qkvo")),
                ),
                ffn_in=_t5_ffn_in(2),
                ffn_out="layer.2.DenseReluDense.wo",
                position_bias="layer.0.SelfAttention.relative_attention_bias",
            ),
        ),
    ),
)

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for f in FAMILIES for t in f.model_types)


def find_family(model_type: str) -> Family:
    """Return the family entry for a ``config.model_type``.

    Raises
    ------
    UnsupportedModelError
        If no family covers ``model_type``; the message lists the supported ones.
    """
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise UnsupportedModelError(
        f"model_type {model_type!r} is not supported; supported model types are "
        f"{', '.join(SUPPORTED_MODEL_TYPES)}"
    )


ATTENTION_DROPOUT_KEYS = (
    "attention_probs_dropout_prob",  # BERT, RoBERTa, ELECTRA, ViT
    "attention_dropout",  # DistilBERT, Llama-style decoders
    "attn_pdrop",  # GPT-2
    "dropout_rate",  # T5
)
"""Config attributes that hold a family's attention dropout probability."""


def attention_materialized(config: Any) -> bool:
    """Whether training a model of ``config`` (a ``PretrainedConfig``) keeps attention scores.

    Eager attention does; so does SDPA on CPU whenever attention dropout
    (:data:`ATTENTION_DROPOUT_KEYS`) is on: PyTorch's fused CPU kernel takes
    no dropout, and its math fallback keeps the probabilities, the dropout
    mask and the dropped probabilities. The result is a
    :class:`raffm_core.TrainingProfile`'s ``eager_attention``.
    """
    if getattr(config, "_attn_implementation", None) == "eager":
        return True
    return any(
        isinstance(p := getattr(config, key, None), int | float) and p > 0
        for key in ATTENTION_DROPOUT_KEYS
    )
