"""Export after training: a sub-model written for a device, loadable without RaFFM where possible.

Inference needs far less memory than training (no gradients, no optimizer
state, and activations are freed layer by layer), so after federated training a
device can run a *larger* sub-model than the one it trained (paper §3.2):
choose it with :func:`raffm_core.cut` (or :func:`~raffm_core.select_subnet`)
under an :class:`InferenceProfile` (the inference memory model, defined in
:mod:`raffm_core.budget`), and write it with :func:`export_model` (or, from the
full model and a spec, :func:`export_submodel`).
``scripts/export_submodels.py`` does both from a run's folder.

(This module was ``raffm_core.deploy``, which still imports with a
deprecation warning.)
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from transformers import PretrainedConfig, PreTrainedModel

from .budget import InferenceProfile
from .errors import SpecError
from .extract import (
    base_config,
    extract_submodel,
    model_class,
    save_submodel,
    spec_of,
    untie_weights,
    untied_keys,
)
from .layout import ModelLayout, describe
from .spec import SubnetSpec

__all__ = ["InferenceProfile", "export_model", "export_submodel", "plain_config"]


def plain_config(model: PreTrainedModel, spec: SubnetSpec) -> PretrainedConfig | None:
    """A stock ``transformers`` config describing ``spec`` of the full ``model``, or ``None``.

    A config can describe a sub-model when every layer keeps the same prefix
    widths, the whole vocabulary, and the architecture's config has a field
    for each width: FFN width always; head counts only where the head size
    is an explicit config field (``head_dim`` of the LLaMA family, ``d_kv`` of
    T5), since BERT-style configs derive it from the head count.
    """
    return _plain_config(base_config(model), describe(model), spec)


def _plain_config(
    config: PretrainedConfig, layout: ModelLayout, spec: SubnetSpec
) -> PretrainedConfig | None:
    """:func:`plain_config` from the full model's config (``architectures`` set) and layout."""
    if not spec.is_prefix or len(set(spec.layers)) != 1 or spec.vocab is not None:
        return None
    kept = spec.layers[0]
    config = copy.deepcopy(config)
    setattr(config, layout.family.ffn_size_attr, kept.ffn)
    family = layout.family
    if kept.heads != layout.num_groups:
        if family.kv_heads_attr is not None:
            config.head_dim = layout.head_dim
            config.num_key_value_heads = kept.heads
            config.num_attention_heads = kept.heads * layout.group_size
        elif family.head_dim_attr is not None:
            setattr(config, family.head_dim_attr, layout.head_dim)
            setattr(config, family.heads_attr, kept.heads)
        else:
            return None
    return config


def export_model(model: PreTrainedModel, path: str | os.PathLike) -> str:
    """Write a sub-model (from :func:`~raffm_core.cut` or :func:`extract_submodel`) to ``path``.

    Returns ``"transformers"`` when the directory loads with plain
    ``AutoModel*.from_pretrained(path)`` (uniform widths the config can
    express; a full model always), else ``"raffm"``. Either way
    ``raffm_core.load_submodel(path)`` loads it.
    """
    path = Path(path)
    spec = spec_of(model)
    if spec is None:
        model.save_pretrained(path)
        return "transformers"
    full = base_config(model)
    with torch.device("meta"):  # the full model's layout, without its weights
        layout = describe(model_class(full)(full))
    config = _plain_config(full, layout, spec)
    if config is None:
        save_submodel(model, path)
        return "raffm"
    state = model.state_dict()
    small = type(model)(config)  # as small as the spec: building it for real is cheap
    untie_weights(small, untied_keys(state, describe(small).tied))  # FLAN-T5's lm_head
    small.load_state_dict(state, strict=True)
    small.save_pretrained(path)
    return "transformers"


def export_submodel(model: PreTrainedModel, spec: SubnetSpec, path: str | os.PathLike) -> str:
    """Write the sub-model ``spec`` of the full ``model`` to ``path`` for deployment.

    ``model`` should be prioritized (:func:`~raffm_core.prioritize`), or use
    ``export_model(cut(model, spec).model, path)``. Returns the format as
    :func:`export_model` does.

    Raises
    ------
    SpecError
        If ``model`` is a sub-model already, or ``spec`` does not fit it.
    """
    if spec_of(model) is not None:
        raise SpecError("export_submodel needs the full model, got a sub-model")
    return export_model(extract_submodel(model, spec), path)
