"""Where a method's tensors live in the model, under a name, and how a delta's tensors are checked.

Every method keeps its state under a *delta name* ("default" unless told otherwise), so several
deltas can sit on one loaded base at once and one of them is active:

- A method that adds modules (LoRA, (IA)³, adapters, prompts, prefixes, masks, connectors) puts a
  `DeltaSite` where they go. The site holds one part per delta name in `site.deltas[name]` and runs
  the part of `site.active_delta` (none: the site passes its input through unchanged). In a batch
  that mixes deltas row by row (`mixed_rows`), a site of a method that declares
  `batch_mixing = "per-row"` runs each row with its own delta's part, gathered by a per-row index.
- A method that trains the model's own tensors (the task head always; BitFit's biases, LayerNorm
  tuning's norms, full fine-tuning, freeze) rewrites *base parameters*. The active delta's values
  are the live parameters; the others' values, and the base model's own values, are kept aside by
  reference (`AttachedDeltas`) and bound into the parameters (`parameter.data = ...`) when their
  delta becomes active: switching copies nothing.

Inside the model a delta's own parameters carry the delta name (`...query.deltas.default.lora_A`);
a wrapped layer's weight gains a `base_layer` segment (`...query.base_layer.weight`). The delta
file stores neither: its names are *canonical*, with every `deltas.NAME` and site `base_layer`
segment dropped (`...query.lora_A`, `...query.weight`), so a delta loads under any name, beside any
other delta, and files written before named deltas existed load unchanged.

A delta's tensors are checked in one place (`check_delta_tensors`): every expected tensor present,
nothing unexpected (a backbone weight in a BitFit delta is an error naming it, not a silent
overwrite), each with the shape and dtype the method saves.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.errors import DeltatuneError

if TYPE_CHECKING:
    from deltatune.methods.base import Method

DEFAULT_DELTA = "default"
"""The name a delta gets when none is given (PEFT calls it the default adapter name, too)."""
_DELTA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PARTS = "deltas"
_WRAPPED = "base_layer"


def check_delta_name(name: str) -> None:
    """Delta names become part of parameter names: letters, digits, '_' and '-' only."""
    if not isinstance(name, str) or not _DELTA_NAME.fullmatch(name):
        raise DeltatuneError(
            f"Delta name {name!r} is not usable: give 1 to 64 letters, digits, '_' or '-' "
            "(e.g. 'stsb' or 'sentiment-2'); it becomes part of the model's parameter names."
        )


PartT = TypeVar("PartT", bound=nn.Module)
SiteT = TypeVar("SiteT", bound="DeltaSite")


class DeltaSite(nn.Module, Generic[PartT]):
    """A place in the model where a method keeps its part of each named delta.

    `deltas[name]` is that delta's part (a module holding its parameters, of type `PartT`);
    `active_delta` names the part that runs (None: none does). A site that wraps a layer keeps it as
    `base_layer`. `merged_delta` names a part folded into the base weights (only mergeable sites set it).
    """

    base_layer: nn.Module

    def __init__(self, base_layer: nn.Module | None = None) -> None:
        super().__init__()
        if base_layer is not None:
            self.base_layer = base_layer  # registered first: the wrapped weights keep their place in the order
        self.init_site()

    def init_site(self) -> None:
        """Set up the site's attributes (for sites built without calling `__init__`)."""
        self.deltas = nn.ModuleDict()
        self.active_delta: str | None = None
        self.merged_delta: str | None = None
        self.row_routing: RowRouting | None = None

    def add_part(self, model: nn.Module, name: str, part: PartT, method_name: str) -> None:
        """Hold `part` for delta `name`; it runs when `name` is the model's active delta."""
        if name in self.deltas:
            raise already_applied(method_name, name)
        self.deltas[name] = part
        if attached_deltas(model).active == name:
            self.active_delta = name

    def part_of(self, name: str) -> PartT:
        """Delta `name`'s part (a KeyError when this site holds none)."""
        # nn.ModuleDict is untyped; every part in it came through `add_part`, which takes a PartT
        return cast(PartT, self.deltas[name])

    def active_part(self) -> PartT | None:
        return None if self.active_delta is None else self.part_of(self.active_delta)

    def required_part(self, method_name: str) -> PartT:
        """The active part, for code that reads it; a DeltatuneError when no delta of the method is active."""
        part = self.active_part()
        if part is None:
            raise DeltatuneError(f"No {method_name} delta is active on this layer; activate one first.")
        return part

    def part(self, name: str | None) -> PartT | None:
        return self.part_of(name) if name is not None and name in self.deltas else None

    def row_parts(self, routing: RowRouting) -> list[PartT | None]:
        """In a mixed batch: this site's part of each delta `routing` routes (None where it has none)."""
        return [self.part(name) for name in routing.names]

    def merge(self) -> None:
        """Fold the active part into the base weights (sites of mergeable methods override this)."""
        raise TypeError(f"{type(self).__name__} cannot merge")

    def unmerge(self) -> None:
        raise TypeError(f"{type(self).__name__} cannot unmerge")


def already_applied(method_name: str, name: str) -> DeltatuneError:
    return DeltatuneError(
        f"{method_name} is already applied to this model as delta {name!r}; apply a method "
        "once per delta, to a freshly loaded model, or attach another delta under a new name."
    )


def site_at(module: nn.Module, attribute: str, site_class: type[SiteT]) -> SiteT:
    """The `site_class` site a method keeps on `module` as `attribute` (hooks get the module, not the site)."""
    site = getattr(module, attribute)
    if not isinstance(site, site_class):
        raise TypeError(f"{type(module).__name__}.{attribute} is a {type(site).__name__}, not a {site_class.__name__}")
    return site


def sites(model: nn.Module) -> dict[str, DeltaSite[Any]]:
    return {name: module for name, module in model.named_modules() if isinstance(module, DeltaSite)}


def sites_of(model: nn.Module, delta: str | None, site_class: type[SiteT]) -> dict[str, SiteT]:
    """The `site_class` sites holding a part of delta `delta`, by canonical name, in model order."""
    modules = dict(model.named_modules())
    return {
        canonical_path(modules, name)[1]: module
        for name, module in modules.items()
        if isinstance(module, site_class) and delta is not None and delta in module.deltas
    }


# --------------------------------------------------------------------------------------------- names


def canonical_path(modules: Mapping[str, nn.Module], path: str) -> tuple[str | None, str]:
    """(the delta owning `path`, or None for the base model; `path` without delta-name and wrapper segments)."""
    parts = path.split(".")
    kept: list[str] = []
    owner = None
    prefix = ""
    index = 0
    while index < len(parts):
        part = parts[index]
        module = modules.get(prefix)
        skip = 0
        if isinstance(module, DeltaSite):
            if part == _PARTS and index + 1 < len(parts):
                owner, skip = parts[index + 1], 2
            elif part == _WRAPPED:
                skip = 1
        step = parts[index : index + max(skip, 1)]
        prefix = ".".join([prefix, *step]) if prefix else ".".join(step)
        if not skip:
            kept.append(part)
        index += max(skip, 1)
    return owner, ".".join(kept)


@dataclass
class ParameterIndex:
    """Every parameter of a model by owner and canonical name."""

    base: dict[str, tuple[str, nn.Parameter]] = field(default_factory=dict)
    """Canonical name -> (name in the model, parameter) for the base model's own parameters."""
    own: dict[str, dict[str, tuple[str, nn.Parameter]]] = field(default_factory=dict)
    """Delta name -> canonical name -> (name in the model, parameter) for parameters a delta added."""
    canonical: dict[str, str] = field(default_factory=dict)
    """Name in the model -> canonical name, for every parameter."""

    def of(self, delta: str) -> dict[str, tuple[str, nn.Parameter]]:
        return self.own.get(delta, {})


def parameter_index(model: nn.Module) -> ParameterIndex:
    modules = dict(model.named_modules())
    index = ParameterIndex()
    for name, parameter in model.named_parameters():
        owner, canonical = canonical_path(modules, name)
        index.canonical[name] = canonical
        if owner is None:
            index.base[canonical] = (name, parameter)
        else:
            index.own.setdefault(owner, {})[canonical] = (name, parameter)
    return index


def canonical_module_name(model: nn.Module, module: nn.Module) -> str:
    """The canonical dotted name of a module of `model` (see the module docstring)."""
    modules = dict(model.named_modules())
    for name, candidate in modules.items():
        if candidate is module:
            return canonical_path(modules, name)[1]
    raise ValueError("the module is not part of the model")


def base_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The base model's own parameters by their name in the model (what no delta added)."""
    return {name: parameter for name, parameter in parameter_index(model).base.values()}


def own_parameter_names(model: nn.Module, delta: str) -> set[str]:
    """Names in the model of the parameters delta `delta` added (its sites' parts)."""
    return {name for name, _ in parameter_index(model).of(delta).values()}


def base_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The base model's own modules (what no delta added) by their name in the model."""
    modules = dict(model.named_modules())
    return {name: module for name, module in modules.items() if canonical_path(modules, name)[0] is None}


# ------------------------------------------------------------------------------------------- checks


@dataclass(frozen=True)
class TensorSpec:
    """What a delta tensor must look like."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    any_rows: bool = False
    """The first dimension may differ: a task head's output layer has one row per label of its task."""

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorSpec:
        return cls(tuple(tensor.shape), tensor.dtype)

    def fits(self, shape: tuple[int, ...]) -> bool:
        if self.any_rows:
            return len(shape) == len(self.shape) and shape[0] >= 1 and shape[1:] == self.shape[1:]
        return shape == self.shape

    def describe(self) -> str:
        return f"({', '.join(['any', *map(str, self.shape[1:])])})" if self.any_rows else str(self.shape)


def head_specs(model: nn.Module) -> dict[str, TensorSpec]:
    """The task head's tensors by canonical name. Heads are per task: the output layer's tensors (one row
    per label) may have any number of rows, so deltas of tasks with different label counts share a base."""
    from deltatune.methods.common import head_names

    index = parameter_index(model)
    head = head_names(model)
    # the output layer: the head's last linear layer (BERT's classifier, Llama's score, RoBERTa's out_proj)
    layers = [
        name for name, module in model.named_modules() if isinstance(module, nn.Linear) and f"{name}.weight" in head
    ]
    output = {f"{layers[-1]}.weight", f"{layers[-1]}.bias"} if layers else set()
    return {
        index.canonical[name]: TensorSpec(tuple(parameter.shape), parameter.dtype, any_rows=name in output)
        for name, parameter in model.named_parameters()
        if name in head
    }


def _listing(names, limit: int = 5) -> str:
    names = sorted(names)
    shown = ", ".join(map(repr, names[:limit]))
    return f"{shown} and {len(names) - limit} more" if len(names) > limit else shown


def check_delta_tensors(
    method_name: str,
    tensors: Mapping[str, torch.Tensor],
    expected: Mapping[str, TensorSpec],
    hint: str = "Was it saved by another deltatune version, with other method options, or for another model?",
) -> None:
    """Raise one DeltatuneError listing every missing, unexpected, misshapen or mistyped tensor."""
    problems = []
    missing = expected.keys() - tensors.keys()
    unexpected = tensors.keys() - expected.keys()
    if missing:
        problems.append(f"missing tensors {_listing(missing)}")
    if unexpected:
        problems.append(
            f"unexpected tensors {_listing(unexpected)} (the {method_name!r} method does not save "
            "them; loading them could overwrite weights of the base model)"
        )
    for name in sorted(expected.keys() & tensors.keys()):
        tensor, spec = tensors[name], expected[name]
        if not spec.fits(tuple(tensor.shape)):
            problems.append(f"tensor {name!r} has shape {tuple(tensor.shape)} but this model expects {spec.describe()}")
        elif tensor.dtype != spec.dtype:
            problems.append(
                f"tensor {name!r} has dtype {str(tensor.dtype).removeprefix('torch.')} but the "
                f"{method_name!r} method saves {str(spec.dtype).removeprefix('torch.')}"
            )
    if problems:
        raise DeltatuneError(
            f"The delta does not fit the {method_name!r} method on this model: {'; '.join(problems)}. {hint}"
        )


# --------------------------------------------------------------------------------- attached deltas


@dataclass
class AttachedDeltas:
    """The deltas applied to one model, which one is active, and the base tensors they replace.

    `stored[name]` holds delta `name`'s values of the base parameters it rewrites while another
    delta is active; `base` holds the base model's own values of parameters some delta rewrites,
    when known. A delta loaded or trained into the live parameters without `keep_base` (the
    single-delta path: `deltatune.load`, training) overwrites them in place, so their base values
    are gone; attaching a second delta that would need them is refused.
    """

    methods: dict[str, Method] = field(default_factory=dict)
    active: str | None = None
    stored: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    base: dict[str, torch.Tensor] = field(default_factory=dict)
    keep_base: bool = False
    rewrites: dict[str, frozenset[str]] = field(default_factory=dict)
    """Per delta, the canonical names of the base parameters it rewrites (fixed once it is applied)."""

    def register(self, name: str, method: Method) -> None:
        check_delta_name(name)
        if name in self.methods:
            raise already_applied(f"{self.methods[name].name!r}", name)
        self.methods[name] = method
        if self.active is None and len(self.methods) == 1:
            self.active = name  # the first delta on a model is active, as when it is the only one

    def rewritten(self, model: nn.Module, name: str, index: ParameterIndex | None = None) -> frozenset[str]:
        """Canonical names of the base parameters delta `name` rewrites."""
        if name not in self.rewrites:
            index = index or parameter_index(model)
            trainable = self.methods[name].trainable_names(model)
            self.rewrites[name] = frozenset(
                canonical for canonical, (model_name, _) in index.base.items() if model_name in trainable
            )
        return self.rewrites[name]

    def forget(self, name: str) -> None:
        self.stored.pop(name, None)
        self.rewrites.pop(name, None)
        self.methods.pop(name, None)


_ATTRIBUTE = "_deltatune_attached"


def attached_deltas(model: nn.Module) -> AttachedDeltas:
    """The model's record of its deltas (created empty on first use)."""
    record = model.__dict__.get(_ATTRIBUTE)
    if record is None:
        record = AttachedDeltas()
        model.__dict__[_ATTRIBUTE] = record
    return record


def write_delta_tensors(model: nn.Module, delta: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """Put delta `delta`'s tensors (canonical names, already checked) where they belong.

    Its own parameters are copied into its parts. Base parameters it rewrites are copied into the
    live parameters when it is active (keeping nothing: the single-delta path), bound by reference
    when it is active and the model keeps base values, and kept aside for later when it is not.
    """
    record = attached_deltas(model)
    index = parameter_index(model)
    own = index.of(delta)
    with torch.no_grad():
        for canonical, tensor in tensors.items():
            if canonical in own:
                parameter = own[canonical][1]
                parameter.copy_(tensor)
                continue
            parameter = index.base[canonical][1]
            value = tensor.to(parameter.device)
            if record.active != delta:
                if value is tensor:
                    value = tensor.clone()  # the caller's tensor stays the caller's
                record.stored.setdefault(delta, {})[canonical] = value
                live_is_base = record.active is None or canonical not in record.rewritten(model, record.active)
                if record.keep_base and canonical not in record.base and live_is_base:
                    record.base[canonical] = parameter.data
            elif record.keep_base:
                record.base.setdefault(canonical, parameter.data)
                parameter.data = value if value is not tensor else value.clone()
            elif parameter.shape != value.shape:  # a task head with another number of labels
                parameter.data = value if value is not tensor else value.clone()
            else:
                parameter.copy_(value)


def read_delta_tensors(model: nn.Module, delta: str, names: set[str]) -> dict[str, torch.Tensor]:
    """Delta `delta`'s values of the parameters `names` (names in the model), under canonical names."""
    record = attached_deltas(model)
    index = parameter_index(model)
    stored = record.stored.get(delta, {}) if record.active != delta else {}
    state = {}
    for name, parameter in model.named_parameters():
        if name not in names:
            continue
        canonical = index.canonical[name]
        if canonical in index.base and record.active != delta:
            if canonical not in stored:
                raise DeltatuneError(
                    f"Delta {delta!r} is not active and holds no value of {canonical!r}; "
                    "activate it first (deltatune.methods.activate_delta)."
                )
            state[canonical] = stored[canonical]
        else:
            state[canonical] = parameter.detach()
    return state


def activate_delta(model: nn.Module, name: str | None) -> None:
    """Make delta `name` the one that runs (None: the base model alone).

    Switching binds each delta's kept values into the base parameters and copies nothing; only a
    delta applied for training beside others, never loaded, gets its own copy of its starting values.
    """
    record = attached_deltas(model)
    if name is not None and name not in record.methods:
        raise DeltatuneError(
            f"No delta named {name!r} is attached to this model; attached: "
            f"{', '.join(map(repr, record.methods)) or 'none'}."
        )
    merged = [site_name for site_name, site in sites(model).items() if site.merged_delta is not None]
    if merged:
        raise DeltatuneError(
            f"Delta {sites(model)[merged[0]].merged_delta!r} is merged into the base weights "
            f"(e.g. at {merged[0]!r}); unmerge it before switching deltas."
        )
    index = parameter_index(model)
    rewritten = {delta: record.rewritten(model, delta, index) for delta in record.methods}
    needed = set().union(*rewritten.values()) - (rewritten[name] if name is not None else set())
    unknown = sorted(needed - record.base.keys())
    if unknown:
        owners = sorted(delta for delta, names in rewritten.items() if set(unknown) & names)
        raise DeltatuneError(
            f"Cannot switch to {'the base model' if name is None else repr(name)}: it needs the base model's own "
            f"values of {_listing(unknown, 3)}, but delta(s) {', '.join(map(repr, owners))} were loaded or trained "
            "into those weights in place, so they are gone. Load the base afresh and attach every delta with "
            "attach_delta."
        )
    current = record.active
    if current is not None:
        record.stored[current] = {canonical: index.base[canonical][1].data for canonical in rewritten[current]}
    if name is not None:  # a delta applied but never loaded starts from the base values (or the live ones)
        start = record.stored.setdefault(name, {})
        for canonical in rewritten[name] - start.keys():
            live = index.base[canonical][1].data
            if canonical not in record.base and (current is None or canonical not in rewritten[current]):
                record.base[canonical] = live  # nothing rewrote it yet: the live value is the base's
            start[canonical] = record.base.get(canonical, live).clone()
    for canonical in set().union(*rewritten.values()):
        parameter = index.base[canonical][1]
        own = rewritten[name] if name is not None else set()
        kept = record.stored[name] if name is not None and canonical in own else record.base
        if kept[canonical].device != parameter.device:  # the model moved after the delta was attached
            kept[canonical] = kept[canonical].to(parameter.device)
        if parameter.data is not kept[canonical]:
            parameter.data = kept[canonical]
    for site in sites(model).values():
        site.active_delta = name if name is not None and name in site.deltas else None
    record.active = name


def needs_unknown_base(model: nn.Module, rewrites: set[str]) -> list[str]:
    """Base parameters other deltas rewrote in place that a delta rewriting only `rewrites` would need."""
    record = attached_deltas(model)
    index = parameter_index(model)
    needed: set[str] = set()
    for delta in record.methods:
        needed |= record.rewritten(model, delta, index)
    return sorted((needed - rewrites) - record.base.keys())


def merge_sites(model: nn.Module, method: Method, site_class: type[DeltaSite[Any]], merge: bool) -> None:
    """Merge (or unmerge) the parts of `method`'s delta at every `site_class` site of `model`."""
    name = method.delta_name
    found = list(sites_of(model, name, site_class).values())
    if not found:
        raise DeltatuneError(
            f"This model has no {method.name!r} layers of delta {name!r}: apply the method (or load its delta) first."
        )
    if merge and attached_deltas(model).active != name:
        raise DeltatuneError(f"Delta {name!r} is not the active one; activate it before merging it.")
    for site in found:
        if merge:
            site.merge()
        else:
            site.unmerge()


def detach_delta(model: nn.Module, name: str) -> None:
    """Remove delta `name` from the model (switch to another first if it is active)."""
    record = attached_deltas(model)
    if name not in record.methods:
        raise DeltatuneError(
            f"No delta named {name!r} is attached to this model; attached: "
            f"{', '.join(map(repr, record.methods)) or 'none'}."
        )
    if record.active == name:
        raise DeltatuneError(
            f"Delta {name!r} is active; activate another delta (or None, the base model) before detaching it."
        )
    index = parameter_index(model)
    still_rewritten: set[str] = set()
    for delta in record.methods:
        if delta != name:
            still_rewritten |= record.rewritten(model, delta, index)
    for site in sites(model).values():
        if name in site.deltas:
            del site.deltas[name]
    record.forget(name)
    for canonical in list(record.base):
        if canonical not in still_rewritten:
            del record.base[canonical]  # the live parameter holds it now (no active delta rewrites it)


# ------------------------------------------------------------------------------------- mixed batches

PER_ROW = "per-row"
GROUPED = "grouped"


@dataclass
class RowRouting:
    """Which delta each row of one batch runs: group `index[row]` of `names` (None: the base model alone)."""

    names: tuple[str | None, ...]
    index: torch.Tensor
    """(rows,) long: each row's position in `names`."""
    cache: dict = field(default_factory=dict)
    """What sites stack from their parts for these `names` (shared by batches routing the same names)."""
    _rows: dict = field(default_factory=dict)
    state: dict = field(default_factory=dict)
    """What this batch's forward pass passes between hooks (a pre-hook's row offsets for its post-hook)."""
    segments: tuple[tuple[int, int, int], ...] | None = None
    """(group, first row, end row) per group when each group's rows are one contiguous run (a batch sorted by
    delta, `RowMixer.grouped_order`); None otherwise. See `contiguous`."""
    per_delta_cache: dict = field(default_factory=dict)
    """What sites prepare from one delta's part (shared by every batch of the mixed-batch session)."""

    def per_delta(self, owner: object, kind: str, build: Callable[[str | None], Any]) -> list[Any]:
        """`build(name)` for each routed name, each prepared once per delta for the session (a batch's set of
        deltas changes from batch to batch; a delta's cast weights do not)."""
        prepared = []
        for name in self.names:
            key = (kind, id(owner), name)
            if key not in self.per_delta_cache:
                self.per_delta_cache[key] = build(name)
            prepared.append(self.per_delta_cache[key])
        return prepared

    def contiguous(self) -> tuple[tuple[int, int, int], ...] | None:
        """The runs of rows per group, when sites may work on slices of the batch instead of gathering per row.

        Only outside autograd: the sliced paths write into their outputs in place. With the rows of each
        delta together, a site runs each delta's own small computation on its slice (no per-row copies of
        weights) and leaves rows of deltas without a part at the site untouched, as a segmented kernel does.
        """
        return None if torch.is_grad_enabled() else self.segments

    def joined_mask(
        self, owner: torch.Tensor, dtype: torch.dtype, start: int = 0, end: int | None = None
    ) -> torch.Tensor:
        """(rows, units): 1 where a joined unit (`joined_owners`) belongs to the row's own delta, else 0; for
        rows `start:end` of the batch."""
        return (self.index[start:end, None] == owner[None, :]).to(dtype)

    def span(self, parts: Sequence[Any]) -> tuple[int, int]:
        """(first row, end row) of a contiguous batch's groups that have a part at a site (`parts[group]` not
        None): the rows a site's joined computation needs. Rows of other groups inside the span are masked
        out (`joined_mask`); `RowMixer.grouped_order` places deltas of one method side by side, so the span
        of a site that one method owns holds that method's rows alone."""
        assert self.segments is not None  # a contiguous batch
        covered = [(start, end) for group, start, end in self.segments if parts[group] is not None]
        assert covered  # a joined site has parts
        return covered[0][0], covered[-1][1]

    def rows(self, *groups: int) -> torch.Tensor:
        """The rows (ascending) of the given groups in this batch."""
        if groups not in self._rows:
            mask = torch.zeros_like(self.index, dtype=torch.bool)
            for group in groups:
                mask |= self.index == group
            self._rows[groups] = mask.nonzero().flatten()
        return self._rows[groups]

    def stacked(self, owner: object, build: Callable[[], Any], kind: str = "stack") -> Any:
        """`build()` once per owner (a site, a module) and `kind` for these names; later batches reuse it."""
        key = (kind, id(owner))
        if key not in self.cache:
            self.cache[key] = build()
        return self.cache[key]


JOINED_UNITS_PER_WIDTH = 4
"""Sites join the routed deltas' units (LoRA ranks, adapter bottleneck units) into one matmul pair while the
units add up to at most this many times the layer's narrower side (1,536 on MiniLM-L6: 192 deltas of rank 8)."""


def joined_owners(groups: list[int], widths: list[int], device: torch.device) -> torch.Tensor:
    """Each joined unit's group: `widths[i]` units of group `groups[i]`, in order (the columns that
    `RowRouting.joined_mask` keeps for each row).

    A batch of K deltas joined costs two matmuls over all their units, each row's product masked to its own
    delta's units (every other unit contributes an exact zero), instead of K slices of two small matmuls.
    """
    return torch.repeat_interleave(
        torch.tensor(groups, device=device), torch.tensor(widths, device=device), output_size=sum(widths)
    )


_STACKED_SETS = 8
"""How many sets of routed deltas a mixed-batch session keeps the gathered stacks of."""


class RowMixer:
    """Routes the rows of each forward pass to their own deltas (made by `mixed_rows`)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.record = attached_deltas(model)
        self.sites = list(sites(model).values())
        self.routing: RowRouting | None = None
        self._caches: dict[tuple, dict] = {}
        self._per_delta: dict = {}
        self._patched: list[nn.Module] = []

    def route(self, row_deltas: list[str | None]) -> RowRouting:
        """The next forward pass runs row i with delta `row_deltas[i]` (None: the base model alone)."""
        order = {name: position for position, name in enumerate(self.record.methods)}
        unknown = sorted({name for name in row_deltas if name is not None and name not in order})
        if unknown:
            raise DeltatuneError(
                f"No delta named {unknown[0]!r} is attached to this model; attached: "
                f"{', '.join(map(repr, order)) or 'none'}."
            )
        grouped = sorted(
            {name for name in row_deltas if name is not None and self.record.methods[name].batch_mixing != PER_ROW}
        )
        if grouped:
            method = self.record.methods[grouped[0]]
            raise DeltatuneError(
                f"Delta {grouped[0]!r} ({method.name}) cannot share a forward pass with other "
                f"deltas row by row (its method declares batch_mixing={method.batch_mixing!r}); "
                "run its rows in a forward pass of their own with the delta active."
            )
        # a fixed order of names, so batches that route the same deltas share what sites stack
        names = tuple(sorted(set(row_deltas), key=lambda name: -1 if name is None else order[name]))
        position = {name: group for group, name in enumerate(names)}
        device = next(self.model.parameters()).device
        groups = [position[name] for name in row_deltas]
        index = torch.tensor(groups, dtype=torch.long, device=device)
        if (names, device) not in self._caches and len(self._caches) >= _STACKED_SETS:
            del self._caches[next(iter(self._caches))]  # a long session sees many sets of deltas: keep the latest
        routing = RowRouting(
            names,
            index,
            self._caches.setdefault((names, device), {}),
            segments=_segments(groups),
            per_delta_cache=self._per_delta,
        )
        self.use(routing)
        return routing

    def per_token(self, lengths: torch.Tensor) -> RowRouting:
        """The routing of the current batch's tokens, packed row after row (`lengths[row]` tokens each) and
        each presented to the sites as a row of its own: token t runs its row's delta.

        Only for a batch whose rows are grouped by delta (`grouped_order`): each delta's tokens are then one
        contiguous run as well. Install it with `use`; the row routing comes back with `use` again.
        """
        rows = self.routing
        assert rows is not None and rows.segments is not None  # a routed batch sorted by delta
        ends = torch.cumsum(lengths, 0).tolist()
        segments = tuple((group, ends[start - 1] if start else 0, ends[end - 1]) for group, start, end in rows.segments)
        index = torch.repeat_interleave(rows.index, lengths.to(rows.index.device), output_size=ends[-1])
        return RowRouting(rows.names, index, rows.cache, segments=segments, per_delta_cache=rows.per_delta_cache)

    def use(self, routing: RowRouting) -> None:
        """Route the next forward pass (or the rest of this one) by `routing`."""
        self.routing = routing
        for site in self.sites:
            site.row_routing = routing

    def grouped_order(self, row_deltas: list[str | None]) -> list[int]:
        """Positions of `row_deltas` reordered so each delta's rows are together (stable within a delta), and
        the deltas of one method side by side.

        A batch routed in this order runs each site on contiguous slices (`RowRouting.contiguous`), and a site
        that only one method's deltas have (LoRA's, an adapter's) computes on their span of rows alone
        (`RowRouting.span`), not on the whole batch.
        """
        methods = self.record.methods
        first_of_method: dict[str, int] = {}
        order: dict[str, tuple[int, int]] = {}
        for position, (name, method) in enumerate(methods.items()):
            order[name] = (first_of_method.setdefault(method.name, position), position)

        def place(row: int) -> tuple[int, int]:
            name = row_deltas[row]
            return (-1, -1) if name is None else order.get(name, (len(order), 0))

        return sorted(range(len(row_deltas)), key=place)

    def _install(self) -> None:
        """Every base module whose tensors a per-row delta rewrites runs each row with its delta's values."""
        index = parameter_index(self.model)
        modules = dict(self.model.named_modules())
        owned: dict[str, dict[str, str]] = {}
        for name, method in self.record.methods.items():
            if method.batch_mixing != PER_ROW:
                continue
            for canonical in self.record.rewritten(self.model, name, index):
                module_name, _, leaf = index.base[canonical][0].rpartition(".")
                owned.setdefault(module_name, {})[leaf] = canonical
        for module_name, leaves in owned.items():
            module = modules[module_name]
            module.forward = _RowwiseModule(self, module, leaves)
            self._patched.append(module)

    def _remove(self) -> None:
        for module in self._patched:
            del module.forward
        self._patched.clear()
        for site in self.sites:
            site.row_routing = None
        self.routing = None


def _stacked_rows(outputs: list[torch.Tensor]) -> torch.Tensor:
    """The slices' outputs back in one batch, narrower ones (heads of fewer labels) zero-padded."""
    width = max(output.shape[-1] for output in outputs)
    return torch.cat([F.pad(output, (0, width - output.shape[-1])) for output in outputs])


def _segments(groups: list[int]) -> tuple[tuple[int, int, int], ...] | None:
    """(group, start, end) runs of equal groups, or None when some group's rows are not all in one run."""
    runs: list[tuple[int, int, int]] = []
    for row, group in enumerate(groups):
        if runs and runs[-1][0] == group:
            runs[-1] = (group, runs[-1][1], row + 1)
        else:
            runs.append((group, row, row + 1))
    return tuple(runs) if len(runs) == len(set(groups)) else None


class _RowwiseModule:
    """A base module's forward in a mixed batch: each row with its delta's values of the module's tensors.

    A linear layer whose deltas differ only in the bias (BitFit) runs one matmul and adds each row's
    bias; any other linear layer (a task head) gathers each row's weight and bias (zero-padded to the
    widest head) into one batched matmul; a LayerNorm normalises once and applies each row's gain and
    shift; any other module (RMSNorm) runs once per distinct set of values on its rows, and
    outputs of different widths (heads of tasks with different label counts) are padded with zeros.
    """

    def __init__(self, mixer: RowMixer, module: nn.Module, leaves: dict[str, str]) -> None:
        self.mixer, self.module, self.leaves = mixer, module, leaves
        self.original = type(module).forward.__get__(module)

    def _values(self, name: str | None) -> dict[str, torch.Tensor]:
        record = self.mixer.record
        rewritten = record.rewritten(self.mixer.model, name) if name is not None else frozenset()
        stored = record.stored.get(name, {}) if name is not None else {}
        values = {}
        for leaf, canonical in self.leaves.items():
            live = getattr(self.module, leaf).data
            value = stored[canonical] if canonical in rewritten else live
            values[leaf] = value if value.device == live.device else value.to(live.device)
        return values

    def _plan(self, names: tuple[str | None, ...]) -> tuple[str, Any]:
        values = [self._values(name) for name in names]
        module = self.module
        if (
            isinstance(module, nn.Linear)
            and "bias" in self.leaves
            # `.data` is a new tensor object on every access: the storage says whether it is the same weight
            and all("weight" not in group or group["weight"].data_ptr() == module.weight.data_ptr() for group in values)
            and all(group["bias"].shape == module.bias.shape for group in values)
        ):
            return "bias", torch.stack([group["bias"].to(module.weight.dtype) for group in values])
        if isinstance(module, nn.Linear) and set(self.leaves) <= {"weight", "bias"}:
            return "linear", _stack_linear(values, module)
        if (
            isinstance(module, nn.LayerNorm)
            and module.elementwise_affine
            and all(group[leaf].shape == getattr(module, leaf).shape for group in values for leaf in self.leaves)
        ):
            return "norm", {leaf: torch.stack([group[leaf] for group in values]) for leaf in self.leaves}
        sets: dict[tuple, tuple[dict, list[int]]] = {}
        for group, group_values in enumerate(values):
            key = tuple(value.data_ptr() for value in group_values.values())
            sets.setdefault(key, (group_values, []))[1].append(group)
        return "groups", list(sets.values())

    def _own_value(self, name: str | None) -> dict[str, torch.Tensor] | None:
        """Delta `name`'s values of the module's tensors that differ from the live (base) ones; None if none do."""
        values = self._values(name)
        own = {
            leaf: value
            for leaf, value in values.items()
            if value.data_ptr() != getattr(self.module, leaf).data.data_ptr()
        }
        return own or None

    def _sliced_kind(self, own: list[dict[str, torch.Tensor] | None]) -> str:
        module = self.module
        if isinstance(module, nn.Linear) and set(self.leaves) <= {"weight", "bias"}:
            if module.bias is not None and all(
                values is None or (set(values) == {"bias"} and values["bias"].shape == module.bias.shape)
                for values in own
            ):
                return "bias"
            return "linear"
        if isinstance(module, nn.LayerNorm) and module.elementwise_affine:
            return "norm"
        return "groups"

    def _sliced(
        self,
        routing: RowRouting,
        segments: tuple[tuple[int, int, int], ...],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> torch.Tensor:
        """A batch sorted by delta: the module runs once with its live (base) tensors, then only the slices of
        deltas with their own values are redone (a bias shift, a norm, a head) in place."""
        own = routing.per_delta(self, "own", self._own_value)
        kind = self._sliced_kind(own)
        inputs, module = args[0], self.module
        if kind == "bias":
            assert isinstance(module, nn.Linear) and module.bias is not None  # what `_sliced_kind` checked
            output = F.linear(inputs, module.weight, module.bias)
            bias = module.bias
            shifts = routing.per_delta(
                self,
                f"shift {output.dtype}",
                lambda name: (
                    None if (values := self._own_value(name)) is None else (values["bias"] - bias).to(output.dtype)
                ),
            )
            for group, start, end in segments:
                if shifts[group] is not None:
                    output[start:end] += shifts[group]
            return output
        if kind == "norm":
            assert isinstance(module, nn.LayerNorm)  # `_plan` chose "norm" for a LayerNorm only
            output = F.layer_norm(inputs, module.normalized_shape, module.weight, module.bias, module.eps)
            for group, start, end in segments:
                if own[group] is not None:
                    output[start:end] = F.layer_norm(
                        inputs[start:end],
                        module.normalized_shape,
                        own[group].get("weight", module.weight),
                        own[group].get("bias", module.bias),
                        module.eps,
                    )
            return output
        if kind == "linear":  # heads: each delta's own weight passed as a tensor (autocast caches a parameter's
            # cast for the whole forward pass, so a parameter whose .data is swapped would keep its first weight)
            outputs = [
                F.linear(inputs[start:end], *(self._linear_values(own[group]))) for group, start, end in segments
            ]
            return _stacked_rows(outputs)
        outputs = []
        parameters = {leaf: getattr(module, leaf) for leaf in self.leaves}
        live = {leaf: parameter.data for leaf, parameter in parameters.items()}
        try:
            for group, start, end in segments:
                for leaf, parameter in parameters.items():
                    parameter.data = (own[group] or {}).get(leaf, live[leaf])
                sliced = [
                    argument[start:end]
                    if isinstance(argument, torch.Tensor) and argument.shape[:1] == inputs.shape[:1]
                    else argument
                    for argument in args
                ]
                outputs.append(self.original(*sliced, **kwargs))
        finally:
            for leaf, parameter in parameters.items():
                parameter.data = live[leaf]
        return _stacked_rows(outputs)

    def _linear_values(self, own: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A linear layer's (weight, bias) for a group: its own values, or the live ones."""
        module = self.module
        assert isinstance(module, nn.Linear)  # `_plan` chose "linear" for a linear layer only
        own = own or {}
        bias = module.bias
        return own.get("weight", module.weight), own.get("bias", bias) if bias is not None else None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        routing = self.mixer.routing
        if routing is None:
            raise DeltatuneError(
                "A forward pass inside mixed_rows needs its rows routed first: call "
                "mixer.route(row_deltas) with one delta name (or None) per row before it."
            )
        segments = routing.contiguous()
        if segments is not None:
            return self._sliced(routing, segments, args, kwargs)
        kind, plan = routing.stacked(self, lambda: self._plan(routing.names))
        inputs = args[0]
        module = self.module
        if kind == "bias":
            assert isinstance(module, nn.Linear)  # `_plan` chose "bias" for a linear layer only
            output = F.linear(inputs, module.weight, None)
            shape = (output.shape[0],) + (1,) * (output.ndim - 2) + (output.shape[-1],)
            return output + plan[routing.index].to(output.dtype).view(shape)
        if kind == "linear":  # each row's own weight (a task head: rows of several widths, zero-padded)
            weights, biases = plan
            rows = inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])
            output = torch.bmm(rows, weights[routing.index].transpose(1, 2).to(rows.dtype))
            if biases is not None:
                output = output + biases[routing.index].unsqueeze(1).to(output.dtype)
            return output.view(*inputs.shape[:-1], weights.shape[1])
        if kind == "norm":  # normalise once, then each row's own gain and shift
            assert isinstance(module, nn.LayerNorm)  # `_plan` chose "norm" for a LayerNorm only
            output = F.layer_norm(inputs, module.normalized_shape, None, None, module.eps)
            shape = (output.shape[0],) + (1,) * (output.ndim - 2) + (output.shape[-1],)
            gains = plan["weight"][routing.index].view(shape) if "weight" in plan else module.weight
            shifts = plan["bias"][routing.index].view(shape) if "bias" in plan else module.bias
            return output * gains + shifts if shifts is not None else output * gains
        outputs = []
        parameters = {leaf: getattr(self.module, leaf) for leaf in self.leaves}
        live = {leaf: parameter.data for leaf, parameter in parameters.items()}
        try:
            for group_values, groups in plan:
                rows = routing.rows(*groups)
                for leaf, value in group_values.items():
                    parameters[leaf].data = value
                sliced = [
                    argument[rows]
                    if isinstance(argument, torch.Tensor) and argument.shape[:1] == inputs.shape[:1]
                    else argument
                    for argument in args
                ]
                outputs.append((rows, self.original(*sliced, **kwargs)))
        finally:
            for leaf, parameter in parameters.items():
                parameter.data = live[leaf]
        first = outputs[0][1]
        width = max(output.shape[-1] for _, output in outputs)
        result = first.new_zeros((inputs.shape[0], *first.shape[1:-1], width))
        for rows, output in outputs:
            result[rows, ..., : output.shape[-1]] = output
        return result


def _stack_linear(values: list[dict[str, torch.Tensor]], module: nn.Linear):
    """Each group's weight (and bias) of a linear layer, zero-padded to the most output rows."""
    weights = [group.get("weight", module.weight.data) for group in values]
    width = max(weight.shape[0] for weight in weights)
    stack = weights[0].new_zeros(len(weights), width, weights[0].shape[1])
    for group, weight in enumerate(weights):
        stack[group, : weight.shape[0]] = weight
    if module.bias is None:
        return stack, None
    biases = stack.new_zeros(len(values), width)
    for group, group_values in enumerate(values):
        bias = group_values.get("bias", module.bias.data)
        biases[group, : bias.shape[0]] = bias
    return stack, biases


@contextmanager
def mixed_rows(model: nn.Module) -> Iterator[RowMixer]:
    """Within the block, forward passes mix deltas row by row: `mixer.route(["a", "b", "a"])` before each.

    Only deltas whose method declares `batch_mixing = "per-row"` can be routed. The base model is
    active inside (a row routed to None runs it alone); the active delta is restored afterwards.
    """
    record = attached_deltas(model)
    merged = [site_name for site_name, site in sites(model).items() if site.merged_delta is not None]
    if merged:
        raise DeltatuneError(
            f"Delta {sites(model)[merged[0]].merged_delta!r} is merged into the base weights "
            f"(e.g. at {merged[0]!r}); unmerge it before mixing deltas in one batch."
        )
    previous = record.active
    activate_delta(model, None)
    mixer = RowMixer(model)
    try:
        mixer._install()
        yield mixer
    finally:
        mixer._remove()
        activate_delta(model, previous)


__all__ = [
    "DEFAULT_DELTA",
    "AttachedDeltas",
    "DeltaSite",
    "ParameterIndex",
    "TensorSpec",
    "activate_delta",
    "GROUPED",
    "PER_ROW",
    "RowMixer",
    "RowRouting",
    "attached_deltas",
    "base_modules",
    "base_parameters",
    "canonical_module_name",
    "canonical_path",
    "check_delta_name",
    "check_delta_tensors",
    "detach_delta",
    "head_specs",
    "JOINED_UNITS_PER_WIDTH",
    "joined_owners",
    "merge_sites",
    "mixed_rows",
    "own_parameter_names",
    "parameter_index",
    "read_delta_tensors",
    "sites",
    "sites_of",
    "write_delta_tensors",
]
