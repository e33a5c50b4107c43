"""Training regimes: ways of training whatever a method trains, run by the one loop (`deltatune.training`).

A method says *which* parameters train; a regime says *how* they are trained. `TrainConfig.regime` picks one
(`deltatune train --regime mezo`, a `regime` key under a grid's `train`), and every method whose trainable
parameters the regime can handle works with it:

standard
    Backpropagation and AdamW (the default).
mezo (Malladi et al. 2023, "Fine-Tuning Language Models with Just Forward Passes", arXiv:2305.17333)
    Zeroth-order SGD from two forward passes per step. With z ~ N(0, I) drawn from a per-step seed s,

        g = (L(θ + εz) − L(θ − εz)) / 2ε          (the projected gradient, a scalar)
        θ ← θ − η (g z + λ θ)                      (λ: weight decay, on matrices only)

    The in-place trick keeps memory at that of inference: perturb +εz, forward, perturb −2εz, forward,
    perturb +εz (restore), then update with z regenerated from the same seed, one tensor at a time. No z is
    stored, no backward runs, no `.grad` is allocated and there is no optimizer state. The two forwards run
    in eval mode (no dropout), as the paper's code does, so their difference measures the perturbation alone.
    Cost per step: two forwards (no backward); memory: the weights plus the largest single tensor of z plus
    inference activations. Works with any method's trainable parameters (full, LoRA, prefix, ...). It
    needs far smaller learning rates than AdamW for full fine-tuning (the paper: 1e-6 to 1e-7) and many more
    steps. Gradient clipping does not apply (there is no gradient).
hft (Hui et al. 2024, "HFT: Half Fine-Tuning for Large Language Models", arXiv:2404.18466)
    At each stage (every `hft_stage_steps` optimizer steps, default one epoch) a fresh random half of the
    trainable tensors is frozen: within every transformer block half of its trainable tensors (rounded
    down), and half of those below and above the blocks; the paper selects at this level of blocks' modules.
    The draw is reseeded per stage (from the run's seed and the stage number). The task head always trains
    (a freshly initialised head that sat out half the stages would only lag). Frozen-for-now tensors keep
    requires_grad False, so the backward skips their weight gradients and AdamW leaves them (and their
    moments) untouched. Cost: at most a full run's; about half the weight-gradient matmuls.
surgical (Lee et al. 2023, "Surgical Fine-Tuning Improves Adaptation to Distribution Shifts",
    arXiv:2210.11466)
    A short probe trains each block alone (the embeddings, each transformer layer, the top: final norm,
    pooler, head) for `surgical_probe_steps` steps from the same start and scores it on dev; the real run
    then trains only the best block. The task head trains with every block (a random head scores nothing).
    Only what the method trains can be chosen, so `--method full` chooses among whole layers and LoRA among
    its adapters per layer. The probe's dev scores are in the run record (`regime_report`). Cost: one short
    run per block (L + 2 of them) before the real run, whose backward stops at the chosen block.
promot (Wang et al. 2023, "Two-stage LLM Fine-tuning with Less Specialization and More Generalization",
    arXiv:2211.00635)
    Stage 1 tunes a soft prompt with the model frozen (`method.prompt_steps` steps at
    `method.prompt_learning_rate`, keeping its best dev state); stage 2 tunes the model with that prompt
    attached and frozen, for the run's own budget. It runs the `promot` method, whose delta holds both the
    prompt and the model update (see `deltatune.methods.promot`, which says what is built and what is not).
    Cost: a prompt-tuning run (forward and backward through the whole frozen model) before the model run.

Surgical fine-tuning and ProMoT run more than one `Trainer`: `deltatune.regime_runs` runs them (and is what
`deltatune train` calls). A regime that makes no sense with a setting is refused with the fix (e.g. MeZO with gradient
checkpointing: there is no backward to checkpoint).
"""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from deltatune.errors import DeltatuneError

if TYPE_CHECKING:
    from deltatune.methods.base import Method
    from deltatune.training import TrainConfig, Trainer

REGIMES = ("standard", "mezo", "hft", "surgical", "promot")
"""Every regime by name (`TrainConfig.regime`)."""


def regime_problems(config: TrainConfig) -> list[str]:
    """What is wrong with the regime settings of `config` (one sentence each, with the fix)."""
    problems = []
    regime = config.regime
    if config.mezo_epsilon <= 0:
        problems.append(f"mezo_epsilon={config.mezo_epsilon} must be positive (the paper uses 1e-3)")
    if config.hft_stage_steps is not None and config.hft_stage_steps < 1:
        problems.append(f"hft_stage_steps={config.hft_stage_steps} must be at least 1 (or left unset: one epoch)")
    if config.surgical_probe_steps < 1:
        problems.append(f"surgical_probe_steps={config.surgical_probe_steps} must be at least 1")
    if regime != "standard" and config.gradual_unfreezing:
        problems.append(
            f"regime={regime} decides itself what trains when; it cannot be combined with "
            "gradual_unfreezing: drop --gradual-unfreezing or use --regime standard"
        )
    if regime == "mezo":
        if config.gradient_checkpointing:
            problems.append(
                "regime=mezo runs no backward pass, so there is nothing to checkpoint: drop --gradient-checkpointing"
            )
        if config.precision == "fp16":
            problems.append(
                "regime=mezo with precision=fp16: the difference of two fp16 losses 2·epsilon apart "
                "is mostly rounding; use --precision fp32 or bf16"
            )
    if regime in ("surgical", "promot") and config.lr_search is not None:
        problems.append(
            f"regime={regime} with lr_search is not supported (its first stage would run once per "
            "candidate): search the learning rate with --regime standard, then pass --learning-rate"
        )
    return problems


# --------------------------------------------------------------------------------------------- MeZO


def step_seed(seed: int, step: int) -> int:
    """The seed of the perturbation z at optimizer step `step` (from 0): fixed by the run's seed, so a paused
    and resumed run draws the same z."""
    return random.Random(seed * 1_000_003 + step).getrandbits(63)


class ZerothOrder:
    """MeZO's step over `parameters` (in the optimizer's order); see the module docstring for the formula."""

    def __init__(self, parameters: list[nn.Parameter], epsilon: float, seed: int) -> None:
        self.parameters, self.epsilon, self.seed = parameters, epsilon, seed
        self.projected_gradient: float | None = None
        """g of the last step (None before the first, and after a non-finite loss)."""

    def _perturb(self, seed: int, scale: float) -> None:
        """θ ← θ + scale · z, with z regenerated tensor by tensor from `seed`."""
        generator = _generator(self.parameters[0].device, seed)
        for parameter in self.parameters:
            z = torch.randn(parameter.shape, generator=generator, device=parameter.device, dtype=parameter.dtype)
            parameter.add_(z, alpha=scale)

    def _update(self, groups: list[dict], seed: int, projected_gradient: float) -> None:
        """θ ← θ − lr (g z + λ θ) per optimizer group (its lr and weight decay), z from the same seed."""
        generator = _generator(self.parameters[0].device, seed)
        for group in groups:
            rate, decay = group["lr"], group.get("weight_decay", 0.0)
            for parameter in group["params"]:
                z = torch.randn(parameter.shape, generator=generator, device=parameter.device, dtype=parameter.dtype)
                if decay:
                    parameter.mul_(1 - rate * decay)
                parameter.add_(z, alpha=-rate * projected_gradient)

    def step(self, trainer: Trainer, indices: list[int]) -> tuple[float, int, int]:
        """One MeZO step on the batch `indices`; returns the mean of the two losses and the batch's real and
        padded tokens (as the backward step does). A non-finite loss leaves the weights as they were."""
        seed = step_seed(self.seed, trainer.step)
        was_training = trainer.model.training
        trainer.model.eval()  # the same network for both forwards: no dropout masks to tell them apart
        try:
            with torch.no_grad():
                self._perturb(seed, self.epsilon)
                plus, real_tokens, padded_tokens = trainer._forward_backward(indices, backward=False)
                self._perturb(seed, -2 * self.epsilon)
                minus, _, _ = trainer._forward_backward(indices, backward=False)
                self._perturb(seed, self.epsilon)
                loss = (plus + minus) / 2
                self.projected_gradient = None
                if math.isfinite(loss):
                    self.projected_gradient = (plus - minus) / (2 * self.epsilon)
                    self._update(trainer.optimizer.param_groups, seed, self.projected_gradient)
        finally:
            trainer.model.train(was_training)
        return loss, real_tokens, padded_tokens


def _generator(device: torch.device, seed: int) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


MEZO_LEARNING_RATES = {
    "full": (1e-7, 1e-6, 1e-5),
    "lora": (1e-5, 5e-5, 1e-4),
    "prefix-tuning": (1e-3, 5e-3, 1e-2),
}
"""MeZO's learning-rate grids in Malladi et al. 2023 (appendix, RoBERTa-large: full parameters, LoRA, prefix),
for `lr_search: auto` under the regime. SGD on a projected gradient takes steps on another scale than AdamW's
normalised ones (for full fine-tuning, about a hundredth of them)."""
MEZO_RATE_SCALE = 1e-2
"""A method the paper did not tune gets its AdamW candidates times this (the paper's ratio for full fine-tuning
and, within a factor of two, for LoRA)."""


def mezo_learning_rates(method: Method) -> tuple[float, ...]:
    """The candidate rates under MeZO: the paper's grid for `method`, else its AdamW candidates scaled down."""
    if method.name in MEZO_LEARNING_RATES:
        return MEZO_LEARNING_RATES[method.name]
    adamw = method.learning_rate_candidates or (method.default_learning_rate,)
    return tuple(float(f"{rate * MEZO_RATE_SCALE:.3g}") for rate in adamw)


def regime_default_learning_rate(config: TrainConfig, method: Method) -> float:
    """The rate a run uses when none is given: the method's own, or under MeZO the middle of its MeZO grid."""
    if config.regime == "mezo":
        rates = sorted(mezo_learning_rates(method))
        return rates[len(rates) // 2]
    return method.default_learning_rate


def zeroth_order_for(config: TrainConfig, parameters: list[nn.Parameter]) -> ZerothOrder | None:
    """The MeZO step when the regime is mezo, else None (the loop backpropagates)."""
    return ZerothOrder(parameters, config.mezo_epsilon, config.seed) if config.regime == "mezo" else None


# ---------------------------------------------------------------------------------------------- HFT


class HalfFineTuning:
    """HFT's stages over whatever the method trains: at the start of each stage of `every` steps a random half
    of each position's trainable tensors (every block, the embeddings side, the top side; never the task head)
    is frozen, drawn from the run's seed and the stage number."""

    def __init__(self, model: nn.Module, every: int, seed: int) -> None:
        from deltatune.methods.layers import layer_layout

        layout = layer_layout(model)
        self.every, self.seed = every, seed
        self.by_position: dict[int, list[nn.Parameter]] = {}
        for name, parameter in model.named_parameters():
            if parameter.requires_grad and name not in layout.head:
                self.by_position.setdefault(layout.position[name], []).append(parameter)
        self.stage: int | None = None
        self.frozen: list[nn.Parameter] = []
        self.update(0)

    def update(self, step: int) -> None:
        stage = step // self.every
        if stage == self.stage:
            return
        self.stage = stage
        draw = random.Random(self.seed * 1_000_003 + stage)
        self.frozen = []
        for position in sorted(self.by_position):
            parameters = self.by_position[position]
            self.frozen += draw.sample(parameters, len(parameters) // 2)
        frozen_ids = {id(p) for p in self.frozen}
        for parameters in self.by_position.values():
            for parameter in parameters:
                parameter.requires_grad_(id(parameter) not in frozen_ids)

    def finish(self) -> None:
        for parameters in self.by_position.values():
            for parameter in parameters:
                parameter.requires_grad_(True)


def stage_hook(model: nn.Module, config: TrainConfig, steps_per_epoch: int) -> HalfFineTuning | None:
    """The per-step hook that changes what trains (HFT's stages), or None."""
    if config.regime != "hft":
        return None
    return HalfFineTuning(model, config.hft_stage_steps or steps_per_epoch, config.seed)


# ------------------------------------------------------------------------------------------ surgical


def surgical_blocks(model: nn.Module) -> dict[str, set[str]]:
    """Block name ('embeddings', 'layer 0', ..., 'top') -> the trainable parameter names in it, the task head
    left out (it trains with every block); blocks with nothing trainable are left out."""
    from deltatune.methods.layers import EMBEDDINGS, layer_layout

    layout = layer_layout(model)
    blocks: dict[str, set[str]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad or name in layout.head:
            continue
        position = layout.position[name]
        label = "embeddings" if position == EMBEDDINGS else "top" if position == layout.top else f"layer {position}"
        blocks.setdefault(label, set()).add(name)
    return blocks


def check_regime_method(method: Method, config: TrainConfig) -> None:
    """ProMoT's regime and method go together: each without the other is refused, with the fix."""
    from deltatune.methods.promot import ProMoT

    if config.regime == "promot" and not isinstance(method, ProMoT):
        raise DeltatuneError(
            f"regime=promot needs method promot (its delta holds the soft prompt and the model "
            f"update), not {method.name!r}: use --method promot --method.model_method full"
        )
    if isinstance(method, ProMoT) and config.regime != "promot":
        raise DeltatuneError(
            f"method promot trains in two stages, which regime={config.regime} does not run: add --regime promot"
        )


def regime_report(config: TrainConfig) -> dict[str, Any] | None:
    """The record's account of a regime with no probe to report (None for standard)."""
    if config.regime == "mezo":
        return {"regime": "mezo", "epsilon": config.mezo_epsilon, "backward_passes": 0, "optimizer_state": 0}
    if config.regime == "hft":
        return {"regime": "hft", "stage_steps": config.hft_stage_steps or "one epoch"}
    return None


__all__ = [
    "REGIMES",
    "HalfFineTuning",
    "ZerothOrder",
    "check_regime_method",
    "regime_problems",
    "regime_report",
    "stage_hook",
    "surgical_blocks",
    "zeroth_order_for",
]
