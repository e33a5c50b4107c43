"""The method contract: every hook a method can have, declared once, typed, with a default.

A method subclasses `Method`, registers itself with `@register(name, ConfigClass)`, and overrides
the hooks it needs. The training loop and every other caller call hooks directly, so a hook that
is not overridden runs its default here; a public attribute that is not a hook (a misspelt
`on_step_ends`) is refused when the class is defined. Helpers a method needs for itself are
private (`_name`) or module functions.

Hooks (the defaults in brackets):
    apply(model, name)                 add the method's modules for delta `name` [register the delta]
    trainable_names(model)             parameter names that train and are saved (required)
    on_step_end(model, step, total)    per-step updates: masks, schedules [nothing]
    settled(step, total)               whether the delta after `step` is the one the method promises, so a
                                       dev check may keep it as the best state [True]
    extra_loss(model)                  a regulariser added to the task loss [0.0]
    param_groups(model, lr, settings)  AdamW groups honouring weight decay and layer-wise LR decay
                                       [decay on matrices only; lr · decay^depth]
    describe(model)                    facts for the run record [{}]
    merge(model) / unmerge(model)      fold the active delta into the base weights and back
                                       [not offered: `mergeable` is False and both raise]
    delta_state(model)                 what delta.safetensors stores [the trainable tensors]
    load_delta_state(model, tensors)   the inverse, strictly checked [copy by canonical name]
    export_peft(tensors)               the delta in PEFT's adapter format [cannot: raises]
Attributes: `name` (set by @register), `batch_mixing` ("per-row" or "grouped", the default: how a
batch mixing several deltas runs), `position_wise` (its sites act on each token alone),
`default_learning_rate`, `learning_rate_candidates` (derived from the default unless a method sets its
own), `config`, `tokenizer` (given by `prepare_model` to methods that embed text), `delta_name` (set by
`apply`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from deltatune.errors import DeltatuneError, did_you_mean
from deltatune.methods.layers import layer_layout
from deltatune.methods.state import (
    DEFAULT_DELTA,
    GROUPED,
    PER_ROW,
    TensorSpec,
    attached_deltas,
    check_delta_tensors,
    head_specs,
    parameter_index,
    read_delta_tensors,
    write_delta_tensors,
)

if TYPE_CHECKING:
    from deltatune.methods.registry import MethodEntry

REGISTRY: dict[str, MethodEntry] = {}
"""Every registered method by name (filled by `deltatune.methods.registry.register`); kept here, below the
registry, because the default `export_peft` names the methods that can export."""


@dataclass(frozen=True)
class OptimizerSettings:
    """The user's optimizer settings a method's parameter groups must honour."""

    weight_decay: float = 0.01
    """AdamW weight decay for weight matrices (biases, norms and other vectors get none)."""
    layer_lr_decay: float | None = None
    """Each transformer layer's learning rate is this times the one above it (None: one rate)."""


@dataclass(frozen=True)
class PeftAdapter:
    """A delta in PEFT's adapter format, as far as the method knows it."""

    config: dict[str, Any]
    """The method's entries of adapter_config.json (peft_type, target_modules, ...)."""
    tensors: dict[str, torch.Tensor]
    """The method's own tensors under PEFT's names (without the 'base_model.model.' prefix)."""
    rest: dict[str, torch.Tensor]
    """The delta's other tensors (the task head), under their deltatune names."""


def layer_depths(model: nn.Module, settings: OptimizerSettings) -> dict[str, int]:
    """Parameter name -> layers below the top (0 for the head and top), when layer LR decay is on."""
    if settings.layer_lr_decay is None:
        return {}
    layout = layer_layout(model)
    return {name: layout.top - position for name, position in layout.position.items()}


def decay_groups(model: nn.Module, learning_rate: float, settings: OptimizerSettings) -> list[dict]:
    """AdamW groups of the trainable parameters by layer depth and by whether they decay."""
    depths = layer_depths(model, settings)
    groups: dict[tuple[int, bool], list] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            # biases and norm scales are not regularised toward zero (standard AdamW practice)
            groups.setdefault((depths.get(name, 0), parameter.ndim >= 2), []).append(parameter)
    decay = settings.layer_lr_decay or 1.0
    return [
        {"params": params, "weight_decay": settings.weight_decay if decays else 0.0, "lr": learning_rate * decay**depth}
        for (depth, decays), params in sorted(groups.items())
    ]


def _hook_names() -> set[str]:
    return {
        name
        for name, value in vars(Method).items()
        if not name.startswith("_") and (callable(value) or isinstance(value, property))
    }


def _candidates_around(rate: float) -> tuple[float, ...]:
    """A third of the default, the default, and three times it (two significant digits)."""
    return tuple(float(f"{value:.2g}") for value in (rate / 3, rate, rate * 3))


class Method:
    """An adaptation method: which parameters train, what modules it adds, how its delta is stored."""

    name: ClassVar[str]
    """The registered name (`--method NAME`); set by `@register`."""
    default_learning_rate: ClassVar[float] = 5e-5
    """Used when the user gives no --learning-rate."""
    learning_rate_candidates: ClassVar[tuple[float, ...]] = _candidates_around(5e-5)
    """Learning rates worth trying on dev for this method; by default a third of, and three times,
    default_learning_rate around it. A method sets its own by declaring the attribute."""
    batch_mixing: ClassVar[str] = GROUPED
    """How a batch that mixes this method's deltas with other deltas runs (serving many tasks at once):
    "per-row" (one forward pass for the whole batch: the method's sites run each row with its own delta's
    part, gathered by a per-row index; the base tensors it rewrites, if any, are applied row by row) or
    "grouped" (the default: one forward pass per delta, with that delta active). A method declares
    "per-row" only when its sites implement it (see `deltatune.methods.state.mixed_rows`)."""
    position_wise: ClassVar[bool] = False
    """True when each of the method's sites computes every token position from that position alone (no
    tokens added, attention unchanged): a mixed batch may then run its rows' tokens packed, without
    padding, through an encoder's layers (`deltatune.serve.packed`). Declared by per-row methods only."""
    config: Any
    """The method's frozen config dataclass."""
    tokenizer: Any
    """The model's tokenizer, for methods that embed text (set by `prepare_model`; None otherwise)."""
    delta_name: str | None
    """The name the method's delta has on the model it was applied to (set by `apply`)."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.tokenizer = None
        self.delta_name = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        contract = _hook_names() | set(Method.__annotations__)
        for attribute, value in vars(cls).items():
            if attribute.startswith("_"):
                continue
            if attribute not in contract:
                hooks = sorted(_hook_names())
                raise TypeError(
                    f"{cls.__name__}.{attribute} is not part of the method contract (deltatune.methods.base.Method); "
                    f"a misspelt hook would never be called. {did_you_mean(attribute, hooks)} Name helpers "
                    f"with a leading underscore."
                )
            base = vars(Method).get(attribute)
            if callable(value) and callable(base) and _signature(value) != _signature(base):
                raise TypeError(
                    f"{cls.__name__}.{attribute}{inspect.signature(value)} does not match the hook "
                    f"Method.{attribute}{inspect.signature(base)}."
                )
        if cls.batch_mixing not in (PER_ROW, GROUPED):
            raise TypeError(f"{cls.__name__}.batch_mixing={cls.batch_mixing!r} must be {PER_ROW!r} or {GROUPED!r}.")
        # a class that sets its own default rate without its own candidates searches around that default;
        # one that sets neither (Houlsby under the adapters' base, DoRA under LoRA's) inherits both
        if "learning_rate_candidates" not in vars(cls) and (
            "default_learning_rate" in vars(cls) or cls.default_learning_rate not in cls.learning_rate_candidates
        ):
            cls.learning_rate_candidates = _candidates_around(cls.default_learning_rate)

    # ----------------------------------------------------------------------------------- the delta

    def apply(self, model: nn.Module, name: str = DEFAULT_DELTA) -> None:
        """Attach this method to `model` as delta `name`: subclasses call this first, then add modules.

        The first delta on a model is its active one. Applying a method instance twice, or a
        second delta under a name in use, is a DeltatuneError.
        """
        if self.delta_name is not None:
            raise DeltatuneError(
                f"This {self.name!r} method is already applied (as delta {self.delta_name!r}); "
                "build a new one (deltatune.methods.build_method) for another model or delta."
            )
        attached_deltas(model).register(name, self)
        self.delta_name = name

    def trainable_names(self, model: nn.Module) -> set[str]:
        """Names (as in `model.named_parameters()`) of the parameters that train and are saved."""
        raise TypeError(f"{type(self).__name__} must define trainable_names(model): it is the one required hook.")

    def delta_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """What delta.safetensors stores, under canonical names: by default the trainable tensors."""
        return read_delta_tensors(model, self._applied_name(), self.trainable_names(model))

    def load_delta_state(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Load a saved delta: exactly the tensors `delta_state` saves, with their shapes and dtypes."""
        check_delta_tensors(self.name, tensors, self._expected_tensors(model))
        write_delta_tensors(model, self._applied_name(), tensors)

    def _expected_tensors(self, model: nn.Module) -> dict[str, TensorSpec]:
        index, names = parameter_index(model), self.trainable_names(model)
        heads = head_specs(model)
        return {
            index.canonical[name]: heads.get(index.canonical[name]) or TensorSpec.of(parameter)
            for name, parameter in model.named_parameters()
            if name in names
        }

    def _applied_name(self) -> str:
        if self.delta_name is None:
            raise DeltatuneError(
                f"The {self.name!r} method has not been applied to a model yet; apply it "
                "(deltatune.methods.prepare_model) before saving or loading its delta."
            )
        return self.delta_name

    # ---------------------------------------------------------------------------------- training

    def param_groups(self, model: nn.Module, learning_rate: float, settings: OptimizerSettings) -> list[dict]:
        """AdamW groups: weight decay on matrices only, and lr · layer_lr_decay^depth per layer."""
        return decay_groups(model, learning_rate, settings)

    def on_step_end(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Runs after every optimizer step (`step` counts from 1)."""

    def settled(self, step: int, total_steps: int) -> bool:
        """Whether the delta after `step` of `total_steps` is the kind the method promises (a sparse mask whose
        sparsity ramp has ended). Dev checks before it are on the curve, are kept only while no settled one
        exists, and do not count toward early stopping."""
        return True

    def extra_loss(self, model: nn.Module) -> torch.Tensor | float:
        """A term the training loop adds to the task loss of every batch (a regulariser of the method's own)."""
        return 0.0

    def describe(self, model: nn.Module) -> dict:
        """Facts about the trained delta for the run record."""
        return {}

    # ------------------------------------------------------------------------------ merge, export

    @property
    def mergeable(self) -> bool:
        """Whether the method can fold its delta into the base weights (it overrides merge)."""
        return type(self).merge is not Method.merge

    def merge(self, model: nn.Module) -> None:
        """Fold the active delta into the base weights: same outputs, no extra computation."""
        raise DeltatuneError(
            f"The {self.name!r} method cannot be merged into the base weights (its delta is not "
            "a change of the existing weights); use the model as it is."
        )

    def unmerge(self, model: nn.Module) -> None:
        """Take a merged delta back out of the base weights."""
        raise DeltatuneError(
            f"The {self.name!r} method cannot be merged into the base weights, so there is nothing to unmerge."
        )

    def export_peft(self, tensors: dict[str, torch.Tensor]) -> PeftAdapter:
        """This method's delta `tensors` (as saved) in PEFT's adapter format."""
        exportable = sorted(
            name for name, entry in REGISTRY.items() if entry.method_class.export_peft is not Method.export_peft
        )
        raise DeltatuneError(
            f"A {self.name!r} delta cannot be exported to PEFT's format: PEFT has no equivalent "
            f"of this method here (deltas of {', '.join(exportable)} can be exported). Use the "
            f"deltatune delta directory itself (deltatune.load), or retrain with --method "
            f"{' or '.join(exportable)}."
        )


def _signature(function) -> list[tuple[str, Any]]:
    return [(parameter.name, parameter.kind) for parameter in inspect.signature(function).parameters.values()]


__all__ = ["Method", "OptimizerSettings", "PeftAdapter", "decay_groups", "layer_depths"]
