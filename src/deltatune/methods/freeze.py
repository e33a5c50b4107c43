"""Partial freezing: fine-tune only chosen transformer layers (plus the head); the rest stays pretrained.

Radiya-Dixit & Wang 2020 ("How fine can fine-tuning be?", arXiv:2004.14129) show that fine-tuning
only the most critical layers of BERT (those a full fine-tuning run moves furthest from the
pretrained weights) loses little; the classic baseline trains only the top k layers. For a chosen
set S of blocks:

    θ_i trains  ⇔  block(θ_i) ∈ S  or  θ_i is above the last block  (or in the embeddings, if asked)

Choose S with exactly one of `layers` (explicit indices), `top` k, `bottom` k, or `critical` k (the k
blocks that moved most in a previous full fine-tuning run, read from its layer-distance report, see
`deltatune.analysis`). With none given, `top=2`. The critical layers are chosen before the method is
applied (`deltatune.critical_layers`, which training calls), so applying it never loads another run.

What trains above the last block: the task head, and also BERT's pooler and the final norm
(Llama's `model.norm`, GPT-2's `ln_f`). The pooler exists only to feed the classifier ([CLS] →
dense → tanh → classifier), so it is part of the head side, as in every "train the top k layers"
recipe; the final norm is a vector of `hidden` scales. Neither lengthens the backward pass.

Backward cost: autograd only differentiates through operations with an input that requires grad.
With the embeddings and every block below the lowest chosen one frozen, no tensor below that block
requires grad, so the backward pass stops at its input: training the top k of L layers costs about
k/L of a full backward (tests/test_layer_methods.py checks that no hook below ever fires).

Parameter cost: k/L of the block parameters plus the head side. With top=2 and a one-output head:
MiniLM-L6 3.70M of 22.7M (16.3%, of which the pooler is 0.15M); SmolLM2-135M 7.08M of 134.5M (5.3%).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.methods.base import Method
from deltatune.methods.layers import EMBEDDINGS, layer_layout, resolve_layer_indices
from deltatune.methods.registry import register
from deltatune.methods.state import DEFAULT_DELTA, base_parameters

DEFAULT_TOP = 2


@dataclass(frozen=True)
class FreezeConfig:
    layers: tuple[int, ...] = ()
    """Indices of the transformer layers to train (0 = lowest; negative counts from the top, -1 = last)."""
    top: int | None = None
    """Train the top k layers (the default selector, with k=2, when no other is given)."""
    bottom: int | None = None
    """Train the bottom k layers."""
    critical: int | None = None
    """Train the k layers that moved most in the full fine-tuning run given by critical_from."""
    critical_from: str | None = None
    """Run directory (a `deltatune train --out`) of a full fine-tuning run on the same base model, whose
    layer-distance report picks the `critical` layers."""
    critical_metric: Literal["matrix_angle", "angle", "l1_mean"] = "matrix_angle"
    """How `critical` ranks layers: mean angular distance of the layer's weight matrices (the paper's
    measure), angle of the whole layer, or mean absolute change per weight."""
    critical_layers: tuple[int, ...] = ()
    """Filled in by deltatune: the layers `critical` picked. Recorded in the delta so that it loads
    without the critical_from run. Leave empty."""
    train_embeddings: bool = False
    """Also train the embeddings (then the backward pass runs through the whole model)."""

    def __post_init__(self) -> None:
        problems = []
        given = [name for name in ("layers", "top", "bottom", "critical") if getattr(self, name) not in (None, ())]
        if len(given) > 1:
            problems.append(
                "give exactly one of method.layers, method.top, method.bottom, method.critical; got "
                + ", ".join(f"method.{name}={getattr(self, name)!r}" for name in given)
            )
        if not given:  # record the default explicitly, so the saved config says what trained
            object.__setattr__(self, "top", DEFAULT_TOP)
        for name in ("top", "bottom", "critical"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"method.{name}={value} must be at least 1")
        if len(set(self.layers)) != len(self.layers):
            problems.append(f"method.layers={self.layers!r} lists a layer twice")
        if self.critical is not None and not self.critical_from:
            problems.append(
                f"method.critical={self.critical} needs method.critical_from=RUN_DIR, the output "
                "directory of a full fine-tuning run on the same base model"
            )
        if self.critical_from and self.critical is None:
            problems.append(
                f"method.critical_from={self.critical_from!r} is only used with method.critical=K; "
                "add it, or drop critical_from"
            )
        if self.critical_layers and (self.critical is None or len(self.critical_layers) != self.critical):
            problems.append(
                f"method.critical_layers={self.critical_layers!r} is filled in by deltatune for "
                "method.critical; leave it empty"
            )
        if problems:
            raise DeltatuneError("; ".join(problems))


@register("freeze", FreezeConfig)
class Freeze(Method):
    """Partial freezing: only chosen transformer layers (top k, bottom k, listed, or the most critical) train."""

    # the chosen layers are ordinary pretrained weights trained as in full fine-tuning
    default_learning_rate = 5e-5
    # `lr_search: auto`: as full fine-tuning
    learning_rate_candidates = (2e-5, 5e-5, 1e-4, 2e-4)

    def apply(self, model: nn.Module, name: str = DEFAULT_DELTA) -> None:
        if self.config.critical is not None and not self.config.critical_layers:
            # choosing them reads another run; that happens before the method is applied, never here
            raise DeltatuneError(
                f"freeze: method.critical={self.config.critical} needs its layers chosen from "
                f"{self.config.critical_from!r} before the method is applied; call "
                "deltatune.critical_layers.resolve_critical_layers(method, model) first."
            )
        selected_layers(self.config, model)  # fail now, on a bad index, rather than after loading everything
        super().apply(model, name)

    def trainable_names(self, model: nn.Module) -> set[str]:
        layout = layer_layout(model)
        positions = set(selected_layers(self.config, model)) | {layout.top}
        if self.config.train_embeddings:
            positions.add(EMBEDDINGS)
        return layout.names_at(positions) & base_parameters(model).keys()


def selected_layers(config: FreezeConfig, model: nn.Module) -> list[int]:
    """The block indices that train on this model."""
    num_layers = layer_layout(model).num_layers
    model_name = type(model).__name__
    if config.layers:
        return resolve_layer_indices("method.layers", config.layers, num_layers, model_name)
    if config.critical is not None:
        if not config.critical_layers:
            raise RuntimeError("freeze: apply() must run before the critical layers are known")
        return resolve_layer_indices("method.critical_layers", config.critical_layers, num_layers, model_name)
    count = config.top if config.top is not None else config.bottom
    option = "top" if config.top is not None else "bottom"
    assert count is not None  # the config's __post_init__ demands exactly one of layers, top, bottom, critical
    if count > num_layers:
        raise DeltatuneError(
            f"method.{option}={count}, but {model_name} has only {num_layers} transformer "
            f"layers; choose at most {num_layers} (or use the 'full' method)."
        )
    return list(range(num_layers - count, num_layers)) if option == "top" else list(range(count))
