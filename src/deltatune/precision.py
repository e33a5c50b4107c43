"""Numeric precision for training and prediction: fp32, bf16 or fp16 autocast, and "auto" to pick per device.

bf16 runs matrix multiplies under CPU autocast and keeps fp32 master weights for everything that
trains. On CPUs with native bf16 matrix units (AMX, AVX512-BF16) a bf16 matmul at MiniLM's shapes
measured 3.3 TFLOP/s against 0.42 for fp32 on the same core; elsewhere bf16 is emulated and slower,
so "auto" takes bf16 only where the CPU has the instructions.

Frozen weights need no master copy. Autocast would cast each frozen linear weight to bf16 on every
forward (the same rounding every time); `frozen_linear_weights_in_bf16` does that cast once for the
duration of training and puts the exact fp32 values back afterwards, so the matmuls see bit-identical
operands and the saved model is untouched.

On a CUDA GPU "auto" takes bf16 autocast where the GPU supports it (Ampere and later) and fp16 autocast with
loss scaling elsewhere; fp16 exists for those GPUs only. On Apple's MPS "auto" is fp32.
"""

from __future__ import annotations

import typing
from contextlib import contextmanager, nullcontext
from functools import lru_cache
from typing import Literal

import torch
from torch import nn

Precision = Literal["auto", "fp32", "bf16", "fp16"]
"""What a user may ask for: a precision, or auto (chosen per device by `resolve_precision`)."""
PRECISIONS = typing.get_args(Precision)


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU advertises AMX-BF16 or AVX512-BF16 (Linux /proc/cpuinfo; False elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


ResolvedPrecision = Literal["fp32", "bf16", "fp16"]
_RESOLVED: dict[str, ResolvedPrecision] = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}


def resolve_precision(precision: str, device_type: str = "cpu") -> ResolvedPrecision:
    """ "auto" becomes, on the CPU, bf16 where it has native bf16 matmul and fp32 elsewhere; on a CUDA GPU bf16
    where supported, else fp16; on MPS fp32. Others pass through; fp16 off a CUDA GPU is an error, and so is
    a name that is none of these."""
    from deltatune.errors import DeltatuneError

    if precision == "auto":
        if device_type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if device_type == "cpu":
            return "bf16" if cpu_has_native_bf16() else "fp32"
        return "fp32"
    if precision == "fp16" and device_type != "cuda":
        raise DeltatuneError(
            f"precision=fp16 needs a CUDA GPU (this run is on {device_type}): use bf16 or fp32, "
            "or auto to pick for the device."
        )
    if precision not in _RESOLVED:
        raise DeltatuneError(f"precision={precision!r} is not a precision: use auto, fp32, bf16 or fp16.")
    return _RESOLVED[precision]


def autocast_for(precision: str, device_type: str = "cpu"):
    """The autocast context of a resolved precision on a device type (nothing for fp32)."""
    if precision == "auto":
        precision = resolve_precision(precision, device_type)
    if precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    if precision == "fp16":
        return torch.autocast(device_type, dtype=torch.float16)
    return nullcontext()


@contextmanager
def frozen_linear_weights_in_bf16(model: nn.Module, include_trainable: bool = False):
    """Within the block, frozen `nn.Linear` weights and biases are stored in bf16; afterwards, exactly fp32.

    `include_trainable` casts trainable ones too: for prediction under `torch.no_grad`, where nothing trains.
    """
    stashed: list[tuple[nn.Parameter, torch.Tensor]] = []
    # a weight tied to a non-linear module (an LM head tied to the embeddings) is also read outside a
    # matmul, where bf16 would change results: leave it
    shared = {id(p) for m in model.modules() if not isinstance(m, nn.Linear) for p in m.parameters(recurse=False)}
    for module in model.modules():
        if isinstance(module, nn.Linear):
            for parameter in module.parameters(recurse=False):
                if (
                    (include_trainable or not parameter.requires_grad)
                    and parameter.dtype == torch.float32
                    and id(parameter) not in shared
                ):
                    stashed.append((parameter, parameter.data))
                    parameter.data = parameter.data.to(torch.bfloat16)
    try:
        yield model
    finally:
        for parameter, original in stashed:
            parameter.data = original


__all__ = [
    "PRECISIONS",
    "Precision",
    "cpu_has_native_bf16",
    "resolve_precision",
    "autocast_for",
    "frozen_linear_weights_in_bf16",
]
