"""Model families as data.

Each :class:`Family` says, for one transformer architecture, which ``nn.Linear``
modules of a layer share which elastic axis. The algorithms (ranking,
permuting, slicing, aggregating) read only these tables, so supporting a new
architecture means adding an entry to :data:`FAMILIES`, not editing them.

Tensor layouts: a module named here is an ``nn.Linear``, whose ``weight`` is
``(out_features, in_features)``, or, in a family with ``transposed=True``, a
GPT-style ``transformers.pytorch_utils.Conv1D``, whose ``weight`` is
``(in_features, out_features)``. Either way the optional ``bias`` is
``(out_features,)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UnsupportedModelError


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
    """

    name: str
    model_types: tuple[str, ...]
    layers: str
    query: str
    key: str
    value: str
    attn_out: str
    ffn_in: tuple[str, ...]
    ffn_out: str
    heads_attr: str
    kv_heads_attr: str | None
    rotary: bool
    ffn_size_attr: str = "intermediate_size"
    transposed: bool = False
    fused_qkv: bool = False
    ffn_size_factor: int | None = None
    width_attrs: tuple[str, ...] = ("all_head_size",)


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
