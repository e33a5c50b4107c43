"""Choosing which linear layers a method modifies, and wrapping them: shared by the LoRA family and (IA)³.

A target is one string, interpreted in one of two ways:
- a **regex** when it starts with `re:` or contains a regex character other than `.`
  (one of `* + ? [ ] ( ) { } | ^ $ \\`): matched with `re.fullmatch` against the module's full
  dotted name, e.g. `re:.*layer\\.[0-2]\\..*query` (the `re:` prefix is dropped first);
- otherwise a **name suffix**: matches a module whose dotted name is the target or ends with
  `.` + target, so whole components match ('value' and 'attention.self.value' match
  'bert.encoder.layer.0.attention.self.value'; 'alue' does not).

Only `nn.Linear` layers of the pretrained backbone are candidates: the task head always trains in
full, so adapting it too would only add parameters. Layers are named canonically (see
`deltatune.methods.state`): a layer another delta already wraps is still 'bert...query', and the
layers inside other deltas' parts (an adapter's projections) are not candidates.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.methods.common import head_names
from deltatune.methods.state import DeltaSite, PartT, SiteT, canonical_path

REGEX_PREFIX = "re:"
REGEX_CHARACTERS = frozenset("*+?[](){}|^$\\")


@dataclass(frozen=True)
class Target:
    text: str
    """The target as the user wrote it."""
    pattern: re.Pattern | None
    """The compiled regex, or None for a name suffix."""

    def matches(self, module_name: str) -> bool:
        if self.pattern is not None:
            return self.pattern.fullmatch(module_name) is not None
        return module_name == self.text or module_name.endswith("." + self.text)


def is_regex(text: str) -> bool:
    return text.startswith(REGEX_PREFIX) or any(character in REGEX_CHARACTERS for character in text)


def parse_target(text: str) -> Target:
    """A Target; raises re.error for a malformed regex."""
    if not is_regex(text):
        return Target(text, None)
    source = text[len(REGEX_PREFIX) :] if text.startswith(REGEX_PREFIX) else text
    return Target(text, re.compile(source))


def target_problems(option: str, targets: tuple[str, ...]) -> list[str]:
    """Config problems with a targets option (for `__post_init__`), phrased with the option's name."""
    if not targets:
        return [f"{option}=() is empty; name at least one linear layer (e.g. {option}=query,value)"]
    problems = []
    for text in targets:
        if not text.strip() or text.strip() == REGEX_PREFIX:
            problems.append(f"{option} contains an empty target {text!r}; remove it")
            continue
        if text != text.strip():
            problems.append(f"{option} target {text!r} has surrounding spaces; remove them")
            continue
        try:
            parse_target(text)
        except re.error as error:
            problems.append(
                f"{option} target {text!r} is not a valid regex ({error}); fix it, or write a plain "
                "module-name suffix such as 'value' instead"
            )
    return problems


def backbone_linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """Every `nn.Linear` of the backbone by canonical dotted name, in model order (the task head, and
    the layers inside deltas' parts, left out)."""
    head = head_names(model)
    modules = dict(model.named_modules())
    layers = {}
    for name, module in modules.items():
        if isinstance(module, nn.Linear) and f"{name}.weight" not in head:
            owner, canonical = canonical_path(modules, name)
            if owner is None:
                layers[canonical] = module
    return layers


class WrappedLinear(DeltaSite[PartT]):
    """A site around a linear layer (kept as `base_layer`, frozen, not copied): reads like the layer."""

    # the layer itself, or another method's site around it (which reads like the layer in turn)
    base_layer: nn.Linear | WrappedLinear[Any]

    def __init__(self, base_layer: nn.Linear | WrappedLinear[Any]) -> None:
        super().__init__(base_layer)

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight, for code that reads `.weight` of what it takes for a Linear."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def merged(self) -> bool:
        return self.merged_delta is not None

    def extra_repr(self) -> str:
        return f"active={self.active_delta!r}, merged={self.merged_delta!r}"


class WeightUpdate(nn.Module):
    """A delta's part that adds an update linear in the layer's input, which can be written as a matrix."""

    def delta_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The update as a matrix of W's shape, in `dtype`."""
        raise NotImplementedError


UpdateT = TypeVar("UpdateT", bound=WeightUpdate)


class AddedUpdateLinear(WrappedLinear[UpdateT], Generic[UpdateT]):
    """A wrapped layer whose delta parts each add an update linear in the input: h = W x + b + part's term.

    A subclass says what its part adds (`added`); the part's `delta_weight(dtype)` is the same update
    as a matrix of W's shape, which `merge` adds to the base weight and `unmerge` takes back out.
    """

    def added(self, part: UpdateT, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        part = self.active_part()
        if part is None or self.merged_delta is not None:
            return result
        return result + self.added(part, x)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged_delta is None and self.active_delta is not None:
            self.base_layer.weight.add_(self.part_of(self.active_delta).delta_weight(self.base_layer.weight.dtype))
            self.merged_delta = self.active_delta

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged_delta is not None:
            self.base_layer.weight.sub_(self.part_of(self.merged_delta).delta_weight(self.base_layer.weight.dtype))
            self.merged_delta = None


def wrap_layers(
    model: nn.Module, names: list[str], site_class: type[SiteT], wrap: Callable[[nn.Linear | WrappedLinear[Any]], SiteT]
) -> list[SiteT]:
    """The `site_class` site at each canonical layer name, made by `wrap(layer)` where there is none yet.

    A layer another method already wraps is wrapped once more (the outer site passes its input to
    the inner one), so deltas of several methods can sit on one layer.
    """
    found = []
    for name in names:
        layer = model.get_submodule(name)
        if not isinstance(layer, site_class):
            parent_name, _, child_name = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            # the names come from `select_layers`: linear layers, or other methods' sites around them
            assert isinstance(layer, (nn.Linear, WrappedLinear))
            layer = wrap(layer)
            setattr(parent, child_name, layer)
        found.append(layer)
    return found


def example_layer_names(names: list[str], limit: int = 8) -> list[str]:
    """One name per kind of layer (layer numbers ignored), so the hint lists each kind once."""
    seen, examples = set(), []
    for name in names:
        kind = re.sub(r"\.\d+\.", ".N.", name)
        if kind not in seen:
            seen.add(kind)
            examples.append(name)
    return examples[:limit]


def select_layers(model: nn.Module, option: str, targets: tuple[str, ...], defaults: tuple[str, ...]) -> list[str]:
    """Names of the backbone linear layers that `targets` pick, in model order.

    Each target must match at least one layer, so a typo fails loudly instead of training less
    than asked. The exception is the default, which lists the names several architectures use
    (BERT's and Llama's) as alternatives: there, matching any one of them is enough.
    """
    layers = list(backbone_linear_layers(model))
    parsed = [parse_target(text) for text in targets]
    chosen = [name for name in layers if any(target.matches(name) for target in parsed)]
    unmatched = [target.text for target in parsed if not any(target.matches(name) for name in layers)]
    if chosen and (not unmatched or tuple(targets) == tuple(defaults)):
        return chosen
    what = (
        f"{option}={tuple(targets)!r}"
        if not chosen
        else f"{option}={tuple(targets)!r}: the target(s) {', '.join(map(repr, unmatched))}"
    )
    model_class = type(model).__name__
    if not layers:
        raise DeltatuneError(
            f"{what} matched no module of {model_class}: it has no torch.nn.Linear layers "
            "outside its task head, so this method cannot be applied to it."
        )
    examples = example_layer_names(layers)
    raise DeltatuneError(
        f"{what} matched no linear layer of {model_class}; its linear layers are named like "
        f"{', '.join(map(repr, examples))}. Set {option} to some of these names (a last component such as "
        f"{examples[0].rsplit('.', 1)[-1]!r} picks that layer in every block) or to a regex prefixed 're:' "
        "that fully matches the names."
    )
