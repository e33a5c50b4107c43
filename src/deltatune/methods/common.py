"""Small helpers shared by methods: where the task head is, the model's config, which parameters are biases."""

from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig

from deltatune.errors import DeltatuneError


def head_names(model: nn.Module) -> set[str]:
    """Parameters of the task head: everything outside the pretrained backbone.

    For `*ForSequenceClassification` models that is `classifier` (BERT family) or `score`
    (Llama family): freshly initialised for the task, so it always trains and is always saved.
    """
    backbone = getattr(model, "base_model", model)
    if backbone is model:
        return set()
    backbone_ids = {id(p) for p in backbone.parameters()}
    return {n for n, p in model.named_parameters() if id(p) not in backbone_ids}


def text_config(model: nn.Module) -> PretrainedConfig:
    """The model's transformers config (of its text model, where the model has several)."""
    config = getattr(model, "config", None)
    if not isinstance(config, PretrainedConfig):
        raise DeltatuneError(
            f"{type(model).__name__} has no transformers config; this method adapts transformers "
            "models (load the model with deltatune or transformers' Auto classes)."
        )
    return config.get_text_config()


def is_bias(name: str) -> bool:
    return name.endswith(".bias") or name == "bias"
