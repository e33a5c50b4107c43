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
target (`achieved_sparsity(model)` says how sparse). So dev checks during the ramp are kept only until the
first check after it (`settled`), and early stopping counts only checks after it.

Learning rate: with a fixed threshold at zero, the scores would need a large learning rate
(1e-2..1e-1), because a score must travel all the way from its positive initial value to zero before
its entry can switch off. Here the threshold is re-placed every step, and AdamW moves every score by
about lr·(its normalised gradient), so the ranking would not depend on the scale of the learning rate
but for what else scales with it (decoupled weight decay shrinks every score by lr·decay each step, so
a larger rate forgets older gradients sooner; a head, where the task has one, shares the rate). It did
matter on STS-B (MiniLM-L6, bi-encoder head, no head weights): over 3e-4..1e-2 the search chose 1e-2, its
highest; over 1e-2..3e-1 it chose 3e-1, its highest again, with the final dev level (0.885 both); over
3e-1..10 the higher rates stopped early before the sparsity ramp had ended (final dev 0.882). The default
is 1e-2 and the candidates 1e-2..3e-1.

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
from deltatune.methods._linear_targets import backbone_linear_layers
from deltatune.methods.base import Method
from deltatune.methods.common import head_names
from deltatune.methods.layers import layer_layout, resolve_layer_indices
from deltatune.methods.registry import register
from deltatune.methods.state import (
    DEFAULT_DELTA,
    DeltaSite,
    TensorSpec,
    attached_deltas,
    check_delta_tensors,
    head_specs,
    merge_sites,
    own_parameter_names,
    read_delta_tensors,
    sites_of,
    write_delta_tensors,
)

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
            problems.append(
                f"method.warmup_fraction + method.ramp_fraction = "
                f"{self.warmup_fraction + self.ramp_fraction} must be at most 1, so the target "
                "sparsity is reached before training ends"
            )
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
        return self.sparsity * (1.0 - remaining**3)


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


class MaskScores(nn.Module):
    """One delta's real-valued scores of one masked weight; the mask is where they are positive."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.mask_scores = nn.Parameter(torch.full_like(weight, INITIAL_SCORE, dtype=torch.float32))

    @property
    def mask(self) -> torch.Tensor:
        return self.mask_scores.detach() > 0


class MaskedLinear(nn.Linear, DeltaSite[MaskScores]):
    """A Linear whose pretrained weight is multiplied by the active delta's learned binary mask.

    It is the original module, turned into this class in place (same weight and bias under the same
    names, so the layer-distance report and the base fingerprint see the usual `.weight`, and the
    same object, so hooks other deltas put on the layer keep running); each delta's scores are a part.
    """

    _merged_values: tuple[torch.Tensor, torch.Tensor] | None
    """The zeroed entries and their pretrained values, while merged."""

    @classmethod
    def wrap(cls, linear: nn.Linear) -> MaskedLinear:
        linear.__class__ = cls  # not a new module: nn.Linear.__init__ would allocate and initialise a new weight
        assert isinstance(linear, cls)
        linear.init_site()
        linear._merged_values = None
        return linear

    @property
    def mask_scores(self) -> nn.Parameter:
        return self._active_scores().mask_scores

    @property
    def mask(self) -> torch.Tensor:
        return self._active_scores().mask

    def _active_scores(self) -> MaskScores:
        return self.required_part("sparse-mask")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        part = self.active_part()
        if part is None or self.merged_delta is not None:  # no mask, or it is already baked into the weight
            return F.linear(x, self.weight, self.bias)
        return F.linear(x, _MaskedWeight.apply(self.weight, part.mask_scores), self.bias)

    @torch.no_grad()
    def merge(self) -> None:
        """Zero the masked entries in the weight itself (keeping their values for unmerge)."""
        if self.merged_delta is not None or self.active_delta is None:
            return
        dropped = ~self.mask
        self._merged_values = (dropped, self.weight[dropped].clone())
        self.weight[dropped] = 0
        self.merged_delta = self.active_delta

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put the pretrained values of the zeroed entries back."""
        if self.merged_delta is None:
            return
        assert self._merged_values is not None  # `merge` kept them when it set merged_delta
        dropped, values = self._merged_values
        self.weight[dropped] = values
        self._merged_values, self.merged_delta = None, None

    def extra_repr(self) -> str:
        part = self.active_part()
        masked = int((~part.mask).sum()) if part is not None else 0
        return f"{super().extra_repr()}, active={self.active_delta!r}, masked={masked}"


def masked_linears(model: nn.Module, name: str | None = None) -> dict[str, MaskedLinear]:
    """The masked layers holding delta `name`'s scores (default: the active delta's), by canonical name."""
    return sites_of(model, name if name is not None else attached_deltas(model).active, MaskedLinear)


def achieved_sparsity(model: nn.Module, name: str | None = None) -> float:
    """The fraction of the masked weights' entries delta `name` (default: the active one) zeroes."""
    name = name if name is not None else attached_deltas(model).active
    if name is None:
        return 0.0  # no delta is active: nothing is masked
    modules = masked_linears(model, name).values()
    total = sum(m.weight.numel() for m in modules)
    return sum(int((~m.part_of(name).mask).sum()) for m in modules) / total if total else 0.0


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
        lifted = tied[by_magnitude[zeroed - negative :]]
        positive = flat[flat > 0]
        gap = (positive.min() / 2).clamp(min=torch.finfo(flat.dtype).tiny) if positive.numel() else _TIE_GAP
        flat[lifted] = gap


@register("sparse-mask", SparseMaskConfig)
class SparseMask(Method):
    """Sparse fine-tuning: learn which pretrained weight entries to zero (a binary mask, stored as bits)."""

    # see "Learning rate" in the module docstring: measured on STS-B, dev is level from 1e-2 to 3e-1
    default_learning_rate = 1e-2
    learning_rate_candidates = (1e-2, 3e-2, 1e-1, 3e-1)

    def apply(self, model: nn.Module, name: str = DEFAULT_DELTA) -> None:
        targets = _masked_targets(self.config, model)
        if not targets:
            raise DeltatuneError(
                f"{type(model).__name__} has no Linear layer inside its transformer layers, so "
                "'sparse-mask' has nothing to mask (it needs nn.Linear weights; GPT-2's Conv1D "
                "is not supported)."
            )
        super().apply(model, name)
        for linear in targets.values():
            if not isinstance(linear, MaskedLinear):
                linear = MaskedLinear.wrap(linear)
            linear.add_part(model, name, MaskScores(linear.weight), "sparse-mask")

    def trainable_names(self, model: nn.Module) -> set[str]:
        return own_parameter_names(model, self._applied_name()) | head_names(model)

    def describe(self, model: nn.Module) -> dict:
        """The sparsity the saved mask really has (the best dev state may predate the end of the ramp)."""
        return {"target_sparsity": self.config.sparsity, "achieved_sparsity": achieved_sparsity(model, self.delta_name)}

    def settled(self, step: int, total_steps: int) -> bool:
        """Only once the sparsity ramp has reached its target: a mask kept earlier zeroes fewer entries."""
        return self.config.sparsity_at(step, total_steps) >= self.config.sparsity

    def on_step_end(self, model: nn.Module, step: int, total_steps: int) -> None:
        sparsity = self.config.sparsity_at(step, total_steps)
        delta = self._applied_name()
        for name, module in masked_linears(model, delta).items():
            if module.merged_delta is not None:
                raise DeltatuneError(
                    f"sparse-mask: layer {name!r} has its mask merged into the weight, so training "
                    "cannot move the mask further; unmerge it (method.unmerge(model)) before training."
                )
            project_to_sparsity(module.part_of(delta).mask_scores, module.weight, sparsity)

    def delta_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The masks as bits (`<module>.mask`, uint8) plus the head's tensors."""
        name = self._applied_name()
        state = {
            f"{path}.mask": pack_bits(module.part_of(name).mask) for path, module in masked_linears(model, name).items()
        }
        state.update(read_delta_tensors(model, name, head_names(model)))
        return state

    def load_delta_state(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        name = self._applied_name()
        modules = masked_linears(model, name)
        expected = {
            f"{path}.mask": TensorSpec(((module.weight.numel() + 7) // 8,), torch.uint8)
            for path, module in modules.items()
        }
        expected.update(head_specs(model))
        check_delta_tensors(
            "sparse-mask",
            tensors,
            expected,
            "Was it saved with other method.layers / method.targets, or for another model?",
        )
        with torch.no_grad():
            for path, module in modules.items():
                mask = unpack_bits(tensors[f"{path}.mask"], module.weight.shape)
                # only the sign of a score is the mask: kept entries +INITIAL_SCORE, zeroed ones -INITIAL_SCORE
                module.part_of(name).mask_scores.copy_(torch.where(mask, INITIAL_SCORE, -INITIAL_SCORE))
        write_delta_tensors(model, name, {key: tensor for key, tensor in tensors.items() if not key.endswith(".mask")})

    def merge(self, model: nn.Module) -> None:
        """Zero the masked entries in the weights themselves (keeping their values for unmerge)."""
        merge_sites(model, self, MaskedLinear, merge=True)

    def unmerge(self, model: nn.Module) -> None:
        """Put the pretrained values of the zeroed entries back."""
        merge_sites(model, self, MaskedLinear, merge=False)


def _masked_targets(config: SparseMaskConfig, model: nn.Module) -> dict[str, nn.Linear]:
    """The Linear modules to mask, by canonical name."""
    layout = layer_layout(model)
    indices = (
        resolve_layer_indices("method.layers", config.layers, layout.num_layers, type(model).__name__)
        if config.layers
        else range(layout.num_layers)
    )
    prefixes = tuple(f"{layout.block_name(i)}." for i in indices)
    candidates = {name: module for name, module in backbone_linear_layers(model).items() if name.startswith(prefixes)}
    wanted = config.targets
    if not wanted:
        return candidates
    chosen = {
        name: module for name, module in candidates.items() if any(name.endswith(f".{target}") for target in wanted)
    }
    unmatched = [t for t in wanted if not any(name.endswith(f".{t}") for name in candidates)]
    if unmatched:
        examples = sorted({name[len(prefixes[0]) :] for name in candidates if name.startswith(prefixes[0])})
        raise DeltatuneError(
            f"method.targets={wanted!r}: {unmatched} matched no Linear layer inside the transformer layers of "
            f"{type(model).__name__}; there they are named like {', '.join(examples)}."
        )
    return chosen
