"""What the LoRA variants that keep their own layer class (DoRA, PiSSA) share with each other.

Each is LoRA with another update module and another wrapped-layer class: applying puts one update
per delta at every chosen layer, and merging folds the active updates into the base weights at
the variant's own sites (a layer may hold sites of several methods, so they are found by class).
LoRA's options (`use_rslora`, `loraplus_lr_ratio`) and its parameter groups come with it.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from deltatune.methods._linear_targets import WrappedLinear, select_layers, wrap_layers
from deltatune.methods.base import Method
from deltatune.methods.lora import DEFAULT_TARGETS, LoRA, LoRAUpdate
from deltatune.methods.state import DEFAULT_DELTA, merge_sites


class LoRAVariant(LoRA):
    """LoRA with `_update_class` parts at `_site_class` sites."""

    _site_class: ClassVar[type[WrappedLinear[Any]]]
    _update_class: ClassVar[type[LoRAUpdate]]
    # the per-row gather is LoRA's own site's; these sites run one delta per forward pass
    batch_mixing = "grouped"

    def apply(self, model: nn.Module, name: str = DEFAULT_DELTA) -> None:
        names = select_layers(model, "method.targets", self.config.targets, DEFAULT_TARGETS)
        Method.apply(self, model, name)
        config = self.config
        for layer in wrap_layers(model, names, self._site_class, self._site_class):
            layer.add_part(
                model,
                name,
                self._update_class(layer, config.r, config.alpha, config.dropout, config.use_rslora),
                self.name,
            )

    def merge(self, model: nn.Module) -> None:
        """Fold every adapted layer's update into its base weight: outputs stay the same."""
        merge_sites(model, self, self._site_class, merge=True)

    def unmerge(self, model: nn.Module) -> None:
        """Take every update back out of its base weight (undoes `merge` up to float rounding)."""
        merge_sites(model, self, self._site_class, merge=False)
