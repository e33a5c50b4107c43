"""Every adaptation method, registered by name, and the named deltas they keep on a model.

Adding a method means adding one file to this package: a `Method` subclass (the contract, with
every hook and its default, is in `deltatune.methods.base`) registered with `@register(name,
ConfigClass)`. Every module here is imported below, so the registry finds it; nothing else changes.

Named deltas. A method's state on a model lives under a delta name (`prepare_model(..., name=)`,
"default" unless told otherwise), so several deltas, of one method or of several, sit on one
loaded base at once and one of them is active:

    attach_delta(model, build_method("lora", cfg_a), tensors_a, "sentiment")
    attach_delta(model, build_method("bitfit"), tensors_b, "spam")
    activate_delta(model, "spam")      # outputs exactly those of the spam delta loaded alone

- Methods whose delta is per row (LoRA, (IA)³, BitFit, LayerNorm tuning, Houlsby and Pfeiffer
  adapters, prompt and prefix tuning, input-dependent prompts, recursive LMs) keep one part per
  delta at each `DeltaSite` they add (`site.deltas[name]`): all parts are in memory at once, and a
  site runs the part of `site.active_delta`. In a batch that mixes deltas row by row (serving,
  `mixed_rows(model)`), each site runs each row with its own delta's part, without changing what
  is stored: on each delta's slice of the batch when the rows are sorted by delta, else gathered
  by a per-row index; these methods declare `batch_mixing = "per-row"`.
- Methods that rewrite the base model's own tensors (full fine-tuning, freeze, and every method's
  task head; BitFit and LayerNorm tuning too, whose tensors are small enough to gather per row
  later) hold a named set of values that is bound into the live parameters when its delta becomes
  active (`parameter.data = ...`, no copy); the base model's values are kept beside them. Sparse
  masks are parts at their sites, but a masked weight is dense, so a mixed batch runs one forward
  per delta, as for full fine-tuning (`batch_mixing = "grouped"`, the default for any method). In a
  mixed batch, the small base tensors of per-row deltas (BitFit's biases, LayerNorm gains, every
  task head, of any number of labels) are applied row by row.
- Delta files never contain the delta name: tensors are stored under canonical names (the model's
  own names, without `deltas.NAME` and wrapper segments), so a delta loads under any name and files
  from before named deltas existed load unchanged. See `deltatune.methods.state`.

`deltatune.load` and training use one delta (the "default"), loaded into the base weights in place,
as before; `attach_delta` is the way to put several deltas on one base.
"""

import importlib
import pkgutil

from deltatune.methods.base import Method, OptimizerSettings, PeftAdapter
from deltatune.methods.registry import (
    REGISTRY,
    activate_delta,
    active_delta,
    attach_delta,
    attached_delta_names,
    build_method,
    delta_state,
    detach_delta,
    get_method_entry,
    load_delta_state,
    prepare_model,
    register,
)
from deltatune.methods.state import DEFAULT_DELTA, mixed_rows

_INFRASTRUCTURE = {"base", "common", "layers", "prompts", "registry", "state"}
for _module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _module.name not in _INFRASTRUCTURE and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "DEFAULT_DELTA",
    "REGISTRY",
    "Method",
    "OptimizerSettings",
    "PeftAdapter",
    "activate_delta",
    "active_delta",
    "attach_delta",
    "attached_delta_names",
    "build_method",
    "delta_state",
    "detach_delta",
    "get_method_entry",
    "load_delta_state",
    "mixed_rows",
    "prepare_model",
    "register",
]
