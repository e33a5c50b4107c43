"""Data-parallel training over several processes, started by `torchrun` or `accelerate launch`.

Both launchers set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `process_group` joins the
processes through torch.distributed (gloo on the CPU, nccl on CUDA GPUs) when WORLD_SIZE is above 1 and
is a one-process stand-in otherwise, so the training loop has a single code path.

How the work is shared (see `deltatune.training.Trainer`): every rank draws the same length-bucketed
global batch from the same seeded generator and takes its contiguous share (`share_of`); after the
backward passes the gradients are summed over the ranks in one flat all-reduce (each rank's loss is
already weighted by its examples' share of the global batch, so the sum is the global batch's mean
gradient, exactly what one process would get up to float summation order). Dev evaluation runs on rank
0 alone and its stop decision is broadcast each step, so every rank stops at the same step. Only rank 0
prints, takes the output lock and writes the run directory.

With `--fsdp` (full fine-tuning) the model is sharded instead of replicated (torch's FSDP2, `fully_shard`:
each transformer layer, then the rest): every rank keeps 1/N of the weights, gradients and AdamW state,
the forward and backward passes gather each layer's weights when they need them, and the gradients are
reduce-scattered (summed, as above). Every rank then takes part in each evaluation (a forward pass needs
all the shards), and at the end the whole model is gathered onto rank 0's CPU and saved like any delta.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_distributed
from torch import nn

from deltatune.errors import DeltatuneError


@dataclass(frozen=True)
class ProcessGroup:
    rank: int = 0
    """This process's place among the processes (0 writes everything)."""
    world_size: int = 1
    """How many processes train together."""
    backend: str | None = None
    """gloo or nccl; None for one process."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        """Sum each tensor over the ranks in place (one all-reduce per dtype, through a flat buffer)."""
        if not self.distributed or not tensors:
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for tensor in tensors:
            by_dtype.setdefault(tensor.dtype, []).append(tensor)
        for group in by_dtype.values():
            flat = torch.cat([tensor.reshape(-1) for tensor in group])
            torch_distributed.all_reduce(flat)
            offset = 0
            for tensor in group:
                tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
                offset += tensor.numel()

    def broadcast_code(self, code: int, device: torch.device) -> int:
        """Rank 0's `code` on every rank."""
        if not self.distributed:
            return code
        value = torch.tensor([code], dtype=torch.long, device=device)
        torch_distributed.broadcast(value, src=0)
        return int(value.item())

    def all_agree(self, ok: bool, device: torch.device) -> bool:
        """True on every rank when `ok` is true on every rank."""
        if not self.distributed:
            return ok
        value = torch.tensor([0 if ok else 1], dtype=torch.long, device=device)
        torch_distributed.all_reduce(value)
        return int(value.item()) == 0


def launched_world_size() -> int:
    """WORLD_SIZE as a launcher set it (1 when none did)."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(raw)
    except ValueError:
        raise DeltatuneError(
            f"WORLD_SIZE={raw!r} is not a whole number: start several processes with "
            "`torchrun --nproc_per_node N` or `accelerate launch`, which set it."
        ) from None


def process_group(device: torch.device) -> ProcessGroup:
    """Join (once) the processes a launcher started; a single process gets the one-process stand-in."""
    world_size = launched_world_size()
    if world_size <= 1:
        return ProcessGroup()
    if not torch_distributed.is_available():
        raise DeltatuneError(
            f"WORLD_SIZE={world_size} but this torch {torch.__version__} has no torch.distributed: "
            "install a torch build with it, or run one process."
        )
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "mps":
        raise DeltatuneError(
            "Several processes on Apple MPS are not supported by torch.distributed: run one "
            "process, or use --device cpu."
        )
    if not torch_distributed.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch_distributed.init_process_group(backend=backend, init_method="env://")
    return ProcessGroup(
        torch_distributed.get_rank(), torch_distributed.get_world_size(), torch_distributed.get_backend()
    )


FSDP_METHODS = ("full",)
"""Methods whose training state is the whole model, which sharding is for; the others train a small delta
that plain data-parallel training already replicates cheaply."""


def check_fsdp(method_name: str, group: ProcessGroup, regime: str = "standard") -> None:
    """`--fsdp` shards a fully fine-tuned model over several processes, trained by backward passes: refuse it
    anywhere else."""
    if regime != "standard":
        raise DeltatuneError(
            f"--fsdp with --regime {regime} is not supported (the regimes read and change whole "
            "parameters, which sharding splits over the processes): drop one of them."
        )
    if method_name not in FSDP_METHODS:
        raise DeltatuneError(
            f"--fsdp shards a fully fine-tuned model over the processes, but method {method_name!r} "
            "trains a small delta, which plain data-parallel training already handles: drop "
            "--fsdp, or use --method full."
        )
    if not group.distributed:
        raise DeltatuneError(
            "--fsdp shards the model over several processes, but this is one: start them with "
            "`torchrun --nproc_per_node N -m deltatune.cli train ...` (or accelerate launch), or "
            "drop --fsdp."
        )


def shard_model(model: nn.Module) -> None:
    """Shard `model` over the ranks in place (FSDP2): each transformer layer on its own, then the rest, so a
    forward pass holds one layer's full weights at a time. FSDP averages the gradients over the ranks, where
    deltatune's ranks weight their losses to be summed (by each one's share of the global batch): the training
    loop scales a sharded model's loss by the number of ranks (gloo cannot sum with another divide factor)."""
    from torch.distributed.fsdp import fully_shard

    from deltatune.methods.layers import find_layer_list

    for layer in find_layer_list(model)[1]:
        fully_shard(layer)
    fully_shard(model)


def gather_full_state(model: nn.Module) -> dict[str, Any]:
    """A sharded model's whole state dict on rank 0's CPU (an empty dict on the other ranks); every rank
    must call it, as each sends its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def current_rank() -> int:
    """This process's rank (0 outside several processes): what decides who prints."""
    if torch_distributed.is_available() and torch_distributed.is_initialized():
        return torch_distributed.get_rank()
    return int(os.environ.get("RANK", "0") or 0)


def share_of(indices: list[int], rank: int, world_size: int) -> list[int]:
    """Rank `rank`'s contiguous share of a global batch: sizes differ by at most one, neighbours in length
    (a bucketed batch is sorted by length) stay together, and the shares in rank order are the batch."""
    base, extra = divmod(len(indices), world_size)
    start = rank * base + min(rank, extra)
    return indices[start : start + base + (1 if rank < extra else 0)]


__all__ = [
    "ProcessGroup",
    "process_group",
    "current_rank",
    "share_of",
    "launched_world_size",
    "check_fsdp",
    "shard_model",
    "gather_full_state",
    "FSDP_METHODS",
]
