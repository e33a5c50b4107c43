"""Sparse fine-tuning by a learned binary mask (Radiya-Dixit & Wang 2020, arXiv:2004.14129).

The pretrained weights never change: the task model is the pretrained model with a small fraction
of the entries of chosen weight matrices set to zero. Which entries is learned. Each masked matrix
W gets a real-valued score matrix S of its shape, and the layer computes

    y = (W ⊙ M) x + b,    M = 1[S > 0]

The step function has no useful gradient, so the straight-through estimator passes the mask's
gradient to the scores unchanged: ∂L/∂S = ∂L/∂(W ⊙ M) ⊙ W. That is the first-order estimate of
how the loss changes as an entry is switched off: a positive ∂L/∂S_ij says zeroing W_ij helps.
The task head trains normally.

Reaching the target sparsity reliably: a penalty on the scores (the L0-style route) gives whatever
sparsity the penalty strength happens to produce. Instead, after every optimizer step
(`on_step_end`), each matrix's scores are shifted by one constant so that exactly
k = round(s_t · numel) of them are ≤ 0, where the sparsity s_t follows a schedule: 0 during a
warm-up (the scores gather gradient evidence while the mask is still the identity), then rising as
a cubic (Zhu & Gupta 2017) to `sparsity`, then constant. A uniform shift changes no score
difference, so it leaves the learned ranking alone and only places the threshold; which entries are
zeroed is decided by the ranking of the scores alone. Ties at the threshold (entries whose scores
never moved) are broken toward the smaller |W|, so a matrix always has exactly k zeros. Because the
mask is a function of the scores alone, restoring the best dev scores restores its mask exactly;
if that checkpoint came before the ramp ended, the delta zeroes fewer entries than the
target (`achieved_sparsity(model)` says how sparse).

Learning rate: with a fixed threshold at zero, the scores would need a large learning rate
(1e-2..1e-1), because a score must travel all the way from its positive initial value to zero before
its entry can switch off. Here the threshold is re-placed every step, and AdamW moves every score by
about lr·(its normalised gradient), so the ranking, and with it the mask, does not depend on the
scale of the learning rate. The default is therefore chosen for the task head, which shares it:
1e-3, as for the other methods that train the head over a frozen body.

Sparsity: the paper finds good sparsified BERTs at small sparsity levels (a few percent of the
entries of the chosen layers); the default 0.03 is in that range. (The full text was not available
while writing this: check the paper's numbers before quoting them.)

Parameter cost: training holds one fp32 score per masked entry (as many as the masked weights, plus
AdamW state), but the delta stores one BIT per masked entry plus the head: MiniLM-L6 with the
default (every Linear of the 6 blocks, 10.6M entries) → 1.33 MB of mask; SmolLM2-135M (30 blocks,
106M entries) → 13.3 MB, against 90 MB / 538 MB for the full fp32 models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.methods._layers import layer_layout, resolve_layer_indices
from deltatune.methods.common import head_names
from deltatune.methods.registry import register

SCORES = "mask_scores"
"""Name of the score parameter added to every masked Linear."""
INITIAL_SCORE = 1.0
"""Where every score starts (any positive value: mask all ones). Only score differences matter later."""
_TIE_GAP = 1e-6
"""Where a kept score tied at the threshold is placed when no score is above zero yet."""
_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


@dataclass(frozen=True)
class SparseMaskConfig:
    sparsity: float = 0.03
    """Target fraction of the masked weights' entries set to zero (each masked matrix gets exactly this)."""
    layers: tuple[int, ...] = ()
    """Transformer layers whose weights are masked (negative counts from the top). Empty: all of them."""
    targets: tuple[str, ...] = ()
    """Names (or name endings) of the Linear layers to mask inside those layers, e.g. 'query,value' or
    'q_proj,v_proj'. Empty: every Linear of the chosen layers."""
    warmup_fraction: float = 0.1
    """Fraction of the training steps during which nothing is zeroed and the scores only gather gradients."""
    ramp_fraction: float = 0.4
    """Fraction of the training steps, after the warm-up, over which sparsity rises (cubically) to the target."""

    def __post_init__(self) -> None:
        problems = []
        if not 0 < self.sparsity < 1:
            problems.append(f"method.sparsity={self.sparsity} must be between 0 and 1 (a fraction, e.g. 0.03)")
        for name in ("warmup_fraction", "ramp_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"method.{name}={getattr(self, name)} must be between 0 and 1")
        if self.warmup_fraction + self.ramp_fraction > 1:
            problems.append(f"method.warmup_fraction + method.ramp_fraction = "
                            f"{self.warmup_fraction + self.ramp_fraction} must be at most 1, so the target "
                            "sparsity is reached before training ends")
        if problems:
            raise DeltatuneError("; ".join(problems))

    def sparsity_at(self, step: int, total_steps: int) -> float:
        """The scheduled sparsity after `step` of `total_steps` optimizer steps."""
        progress = step / max(1, total_steps)
        if progress <= self.warmup_fraction:
            return 0.0
        if self.ramp_fraction == 0 or progress >= self.warmup_fraction + self.ramp_fraction:
            return self.sparsity
        remaining = 1.0 - (progress - self.warmup_fraction) / self.ramp_fraction
        return self.sparsity * (1.0 - remaining ** 3)


class _MaskedWeight(torch.autograd.Function):
    """W ⊙ 1[S > 0] forward; backward passes the mask's gradient straight to S: ∂L/∂S = g ⊙ W."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        mask = (scores > 0).to(weight.dtype)
        ctx.save_for_backward(weight, mask)
        return weight * mask

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        weight, mask = ctx.saved_tensors
        grad_weight = grad_output * mask if ctx.needs_input_grad[0] else None
        grad_scores = (grad_output * weight).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_weight, grad_scores


class MaskedLinear(nn.Linear):
    """A Linear whose pretrained weight is multiplied by a learned binary mask.

    It shares the original module's weight and bias (same parameter names, so the layer-distance
    report and the base fingerprint see the usual `.weight`), and adds `mask_scores`.
    """

    @classmethod
    def wrap(cls, linear: nn.Linear) -> "MaskedLinear":
        masked = cls.__new__(cls)
        nn.Module.__init__(masked)  # not nn.Linear.__init__: it would allocate and initialise a new weight
        masked.in_features, masked.out_features = linear.in_features, linear.out_features
        masked.register_parameter("weight", linear.weight)
        masked.register_parameter("bias", linear.bias)
        masked.mask_scores = nn.Parameter(torch.full_like(linear.weight, INITIAL_SCORE, dtype=torch.float32))
        masked.merged_values = None  # the pretrained values of the zeroed entries while merged
        return masked

    @property
    def mask(self) -> torch.Tensor:
        return self.mask_scores.detach() > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged_values is not None:  # the mask is already baked into the weight
            return F.linear(x, self.weight, self.bias)
        return F.linear(x, _MaskedWeight.apply(self.weight, self.mask_scores), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, masked={int((~self.mask).sum())}"


def masked_linears(model: nn.Module) -> dict[str, MaskedLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, MaskedLinear)}


def achieved_sparsity(model: nn.Module) -> float:
    """The fraction of the masked weights' entries currently zeroed."""
    modules = masked_linears(model).values()
    total = sum(m.weight.numel() for m in modules)
    return sum(int((~m.mask).sum()) for m in modules) / total if total else 0.0


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor as uint8 bytes, 8 entries per byte, most significant bit first (like np.packbits)."""
    flat = mask.reshape(-1).to(torch.uint8)
    padding = (-flat.numel()) % 8
    if padding:
        flat = torch.cat([flat, flat.new_zeros(padding)])
    return (flat.reshape(-1, 8) * _BITS.to(flat.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The inverse of pack_bits: a boolean tensor of `shape`."""
    count = shape.numel()
    bits = (packed.reshape(-1, 1) & _BITS.to(packed.device)) != 0
    return bits.reshape(-1)[:count].reshape(shape)


def project_to_sparsity(scores: torch.Tensor, weight: torch.Tensor, sparsity: float) -> None:
    """Shift `scores` in place so that exactly round(sparsity·numel) of them are ≤ 0 and the rest > 0.

    One O(n) selection of the k+1 smallest scores gives the k-th and (k+1)-th; the threshold goes
    halfway between them. Entries that tie at the threshold (scores that never moved, or adjacent
    floats) are split by |W|: the smaller weights are zeroed first.
    """
    flat = scores.view(-1)
    count = flat.numel()
    zeroed = min(count - 1, round(sparsity * count))
    with torch.no_grad():
        if zeroed == 0:
            lowest = flat.min()
            if lowest <= 0:  # keep the mask all ones: put the lowest score back where scores start
                flat.sub_(lowest - INITIAL_SCORE)
            return
        smallest = torch.topk(flat, zeroed + 1, largest=False, sorted=False).values
        above, below = torch.topk(smallest, 2).values  # the (k+1)-th and k-th smallest scores
        flat.sub_((below + above) / 2)
        negative = int((flat < 0).sum())
        tied = torch.nonzero(flat == 0).reshape(-1)
        if negative + tied.numel() == zeroed:  # the usual case: no tie across the threshold
            return
        # keep the tied entries with the largest |W|: lift them just above zero, below every other kept score
        by_magnitude = torch.argsort(weight.detach().reshape(-1)[tied].abs(), stable=True)
        lifted = tied[by_magnitude[zeroed - negative:]]
        positive = flat[flat > 0]
        gap = (positive.min() / 2).clamp(min=torch.finfo(flat.dtype).tiny) if positive.numel() else _TIE_GAP
        flat[lifted] = gap


@register("sparse-mask", SparseMaskConfig)
class SparseMask:
    """Sparse fine-tuning: learn which pretrained weight entries to zero (a binary mask, stored as bits)."""

    # the mask depends only on the ranking of the scores, which AdamW makes independent of the learning
    # rate's scale; so the default suits the task head, which shares it (as for BitFit and LayerNorm tuning)
    default_learning_rate = 1e-3
    # `lr_search: auto`: the rate matters for the head (see above), so BitFit's range
    learning_rate_candidates = (3e-4, 1e-3, 3e-3, 1e-2)

    def __init__(self, config: SparseMaskConfig) -> None:
        self.config = config

    def targets(self, model: nn.Module) -> dict[str, nn.Linear]:
        """The Linear modules to mask, by name."""
        layout = layer_layout(model)
        indices = (resolve_layer_indices("method.layers", self.config.layers, layout.num_layers, type(model).__name__)
                   if self.config.layers else range(layout.num_layers))
        prefixes = tuple(f"{layout.block_name(i)}." for i in indices)
        candidates = {name: module for name, module in model.named_modules()
                      if isinstance(module, nn.Linear) and name.startswith(prefixes)}
        wanted = self.config.targets
        if not wanted:
            return candidates
        chosen = {name: module for name, module in candidates.items()
                  if any(name.endswith(f".{target}") for target in wanted)}
        unmatched = [t for t in wanted if not any(name.endswith(f".{t}") for name in candidates)]
        if unmatched:
            examples = sorted({name[len(prefixes[0]):] for name in candidates if name.startswith(prefixes[0])})
            raise DeltatuneError(
                f"method.targets={wanted!r}: {unmatched} matched no Linear layer inside the transformer layers of "
                f"{type(model).__name__}; there they are named like {', '.join(examples)}.")
        return chosen

    def apply(self, model: nn.Module) -> None:
        targets = self.targets(model)
        if not targets:
            raise DeltatuneError(f"{type(model).__name__} has no Linear layer inside its transformer layers, so "
                                 "'sparse-mask' has nothing to mask (it needs nn.Linear weights; GPT-2's Conv1D "
                                 "is not supported).")
        for name, linear in targets.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, MaskedLinear.wrap(linear))

    def trainable_names(self, model: nn.Module) -> set[str]:
        return {f"{name}.{SCORES}" for name in masked_linears(model)} | head_names(model)

    def describe(self, model: nn.Module) -> dict:
        """The sparsity the saved mask really has (the best dev state may predate the end of the ramp)."""
        return {"target_sparsity": self.config.sparsity, "achieved_sparsity": achieved_sparsity(model)}

    def on_step_end(self, model: nn.Module, step: int, total_steps: int) -> None:
        sparsity = self.config.sparsity_at(step, total_steps)
        for name, module in masked_linears(model).items():
            if module.merged_values is not None:
                raise RuntimeError(f"sparse-mask: {name} is merged; unmerge before training")
            project_to_sparsity(module.mask_scores, module.weight, sparsity)

    def delta_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The masks as bits (`<module>.mask`, uint8) plus the head's tensors."""
        state = {f"{name}.mask": pack_bits(module.mask) for name, module in masked_linears(model).items()}
        head = head_names(model)
        state.update({name: p.detach() for name, p in model.named_parameters() if name in head})
        return state

    def load_delta_state(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        modules = masked_linears(model)
        parameters = dict(model.named_parameters())
        head = head_names(model)
        expected = {f"{name}.mask" for name in modules} | head
        missing, unexpected = expected - tensors.keys(), tensors.keys() - expected
        if missing or unexpected:
            raise DeltatuneError(
                f"The delta does not fit the 'sparse-mask' method with this configuration on this model: missing "
                f"tensors {sorted(missing)[:5]}, unexpected tensors {sorted(unexpected)[:5]}. Was it saved with "
                "other method.layers / method.targets, or for another model?")
        with torch.no_grad():
            for name, module in modules.items():
                packed = tensors[f"{name}.mask"]
                if packed.dtype != torch.uint8 or packed.numel() != (module.weight.numel() + 7) // 8:
                    raise DeltatuneError(f"Delta tensor {name}.mask does not fit {name}'s weight of shape "
                                         f"{tuple(module.weight.shape)}: the delta was saved for another model.")
                mask = unpack_bits(packed, module.weight.shape)
                # only the sign of a score is the mask: kept entries +INITIAL_SCORE, zeroed ones -INITIAL_SCORE
                module.mask_scores.copy_(torch.where(mask, INITIAL_SCORE, -INITIAL_SCORE))
            for name in head:
                target, tensor = parameters[name], tensors[name]
                if target.shape != tensor.shape:
                    raise DeltatuneError(f"Delta tensor {name!r} has shape {tuple(tensor.shape)} but the model "
                                         f"expects {tuple(target.shape)}: the delta was saved for another model.")
                target.copy_(tensor.to(target.dtype))

    def merge(self, model: nn.Module) -> None:
        """Zero the masked entries in the weights themselves (keeping their values for unmerge)."""
        with torch.no_grad():
            for module in masked_linears(model).values():
                if module.merged_values is not None:
                    continue
                dropped = ~module.mask
                module.merged_values = (dropped, module.weight[dropped].clone())
                module.weight[dropped] = 0

    def unmerge(self, model: nn.Module) -> None:
        """Put the pretrained values of the zeroed entries back."""
        with torch.no_grad():
            for module in masked_linears(model).values():
                if module.merged_values is None:
                    continue
                dropped, values = module.merged_values
                module.weight[dropped] = values
                module.merged_values = None
