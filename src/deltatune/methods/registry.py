"""The registry that `--method NAME` looks names up in, and the calls that put a method on a model.

A method is a `Method` subclass (see `deltatune.methods.base` for the contract) registered with
its frozen config dataclass:

    @register("lora", LoRAConfig)
    class LoRA(Method): ...

`prepare_model` applies a method for training (everything it does not declare trainable is
frozen); `attach_delta` adds a saved delta beside others on one base, and `activate_delta`
switches between them (see `deltatune.methods.state`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deltatune.config import build_config
from deltatune.errors import DeltatuneError, did_you_mean
from deltatune.methods.base import REGISTRY, Method
from deltatune.methods.state import (
    DEFAULT_DELTA,
    activate_delta,
    attached_deltas,
    check_delta_name,
    detach_delta,
    needs_unknown_base,
    own_parameter_names,
    parameter_index,
    sites,
)


@dataclass(frozen=True)
class MethodEntry:
    name: str
    config_class: type
    method_class: type[Method]

    @property
    def summary(self) -> str:
        doc = (self.method_class.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


def register(name: str, config_class: type):
    """Class decorator: make `name` usable as `--method NAME` with `config_class` as its options."""

    def decorate(method_class: type[Method]) -> type[Method]:
        if name in REGISTRY:
            raise TypeError(f"method {name!r} registered twice")
        if not (isinstance(method_class, type) and issubclass(method_class, Method)):
            raise TypeError(
                f"@register({name!r}) decorates {method_class!r}, which is not a subclass of "
                "deltatune.methods.base.Method"
            )
        if method_class.trainable_names is Method.trainable_names:
            raise TypeError(f"{method_class.__name__} must define trainable_names(model)")
        method_class.name = name
        REGISTRY[name] = MethodEntry(name, config_class, method_class)
        return method_class

    return decorate


def get_method_entry(name: str) -> MethodEntry:
    if name not in REGISTRY:
        raise DeltatuneError(f"Unknown method {name!r}. {did_you_mean(name, REGISTRY)}")
    return REGISTRY[name]


def build_method(name: str, overrides: dict[str, Any] | None = None) -> Method:
    """The method `name` with its config built from `overrides` (e.g. {'r': '4'} from --method.r=4)."""
    entry = get_method_entry(name)
    config = build_config(entry.config_class, overrides or {}, prefix="method.")
    return entry.method_class(config)


def prepare_model(model: nn.Module, method: Method, tokenizer=None, name: str = DEFAULT_DELTA) -> set[str]:
    """Apply `method` to `model` as delta `name`, make it active, and freeze everything it does not train.

    The method is given the model's tokenizer first (prompt tuning initialised from text uses it).
    Returns the trainable names. A declared name that is not a parameter of the model is a bug in
    the method, so it fails loudly here rather than silently training nothing.
    """
    if tokenizer is not None:
        method.tokenizer = tokenizer
    method.apply(model, name)
    if attached_deltas(model).active != name:
        activate_delta(model, name)
    names = set(method.trainable_names(model))
    parameters = dict(model.named_parameters())
    unknown = names - parameters.keys()
    if unknown:
        raise RuntimeError(
            f"method {method.name!r} declared trainable names the model does not have: {sorted(unknown)[:5]}"
        )
    for parameter_name, parameter in parameters.items():
        parameter.requires_grad_(parameter_name in names)
    return names


def delta_state(model: nn.Module, method: Method) -> dict[str, torch.Tensor]:
    """What goes into delta.safetensors (canonical names): `method.delta_state(model)`."""
    return method.delta_state(model)


def load_delta_state(model: nn.Module, method: Method, tensors: dict[str, torch.Tensor]) -> None:
    """Load a saved delta into `model`, where `method` is applied: `method.load_delta_state(model, tensors)`."""
    method.load_delta_state(model, tensors)


def attach_delta(
    model: nn.Module,
    method: Method,
    tensors: dict[str, torch.Tensor],
    name: str,
    tokenizer=None,
    activate: bool = False,
) -> None:
    """Add the saved delta `tensors` of `method` to `model` under `name`, beside the deltas already there.

    The base model's values of every weight the delta rewrites are kept (by reference, not copied),
    so each attached delta, when active, gives exactly the outputs it gives loaded alone. The new
    delta's own parameters do not train. Nothing changes on the model when the delta does not fit.
    """
    check_delta_name(name)
    record = attached_deltas(model)
    if name in record.methods:
        raise DeltatuneError(
            f"A delta named {name!r} is already attached to this model ({record.methods[name].name!r}); "
            "choose another name."
        )
    rewrites = set(tensors) & parameter_index(model).base.keys()
    lost = needs_unknown_base(model, rewrites)
    if lost:
        raise DeltatuneError(
            f"Cannot attach {name!r}: when it is active, {', '.join(map(repr, lost[:3]))} must hold the base model's "
            "values, but a delta already on this model was loaded or trained into them in place. Load the base "
            "afresh and attach every delta with attach_delta."
        )
    record.keep_base = True
    if tokenizer is not None:
        method.tokenizer = tokenizer
    try:
        method.apply(model, name)
        method.load_delta_state(model, tensors)
    except BaseException:
        _forget(model, name)
        raise
    own = own_parameter_names(model, name)
    for parameter_name, parameter in model.named_parameters():
        if parameter_name in own:
            parameter.requires_grad_(False)
    if activate:
        activate_delta(model, name)


def _forget(model: nn.Module, name: str) -> None:
    """Undo a failed attach: its parts, its stored tensors, its registration."""
    record = attached_deltas(model)
    for site in sites(model).values():
        if name in site.deltas:
            del site.deltas[name]
        if site.active_delta == name:
            site.active_delta = None
    method = record.methods.get(name)
    if method is not None:
        method.delta_name = None
    record.forget(name)
    if record.active == name:
        record.active = None


def attached_delta_names(model: nn.Module) -> list[str]:
    """The names of the deltas on `model`, in the order they were attached."""
    return list(attached_deltas(model).methods)


def active_delta(model: nn.Module) -> str | None:
    return attached_deltas(model).active


__all__ = [
    "REGISTRY",
    "MethodEntry",
    "activate_delta",
    "active_delta",
    "attach_delta",
    "attached_delta_names",
    "build_method",
    "delta_state",
    "detach_delta",
    "get_method_entry",
    "load_delta_state",
    "prepare_model",
    "register",
]
