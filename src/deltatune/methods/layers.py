"""Where the transformer layers of a Hugging Face model are, and which layer a parameter belongs to.

Methods that work layer by layer (partial freezing, sparse masks on chosen layers, the layer-distance
report, per-layer learning rates) need two things from any model: the list of its transformer
blocks (`bert.encoder.layer` in BERT, `model.layers` in Llama, `transformer.h` in GPT-2, ...) and,
for every parameter, a position in the stack:

    -1              below the first block: embeddings (and their norm)
    0 .. L-1        inside block i
    L               above the last block: the final norm, BERT's pooler, and the task head

The block list is found structurally rather than from a table of names, so new architectures work
without an edit: it is the `nn.ModuleList` whose children all share one class and which holds the
most parameters. Parameters outside it are placed below or above it by their registration order
(Hugging Face models register embeddings before the blocks and the final norm / pooler after).
An encoder-decoder model has two such lists; only the larger is found, which is why the methods
using this module are defined for encoder-only and decoder-only models. Normalisation layers are
recognised by kind, too (`is_norm`), not by their names in one family.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.methods.common import head_names

EMBEDDINGS = -1
"""The position of everything below the first transformer block."""


@dataclass(frozen=True)
class LayerLayout:
    """The transformer block list of a model and every parameter's position in the stack."""

    prefix: str
    """Dotted name of the block list, e.g. 'bert.encoder.layer'."""
    num_layers: int
    position: dict[str, int]
    """Parameter name (as in `model.named_parameters()`) -> -1, a block index, or num_layers."""
    head: frozenset[str]
    """The task head's parameter names (a subset of those at position num_layers)."""

    @property
    def top(self) -> int:
        """The position above the last block (final norm, pooler, task head)."""
        return self.num_layers

    def names_at(self, positions) -> set[str]:
        wanted = set(positions)
        return {name for name, position in self.position.items() if position in wanted}

    def block_name(self, index: int) -> str:
        """The module name of block `index`, e.g. 'model.layers.3'."""
        return f"{self.prefix}.{index}"


def find_layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's transformer block list and its dotted name; DeltatuneError when it has none."""
    best_name, best_list, best_size = "", None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:  # strictly larger: on a tie the first-registered list wins, deterministically
            best_name, best_list, best_size = name, module, size
    if best_list is None:
        raise DeltatuneError(
            f"Could not find the transformer layers of {type(model).__name__}: it has no list of repeated "
            "blocks (like 'bert.encoder.layer' or 'model.layers'). Layer-wise methods need one; use a "
            "method that does not work by layer (e.g. full, bitfit, layernorm)."
        )
    return best_name, best_list


def layer_layout(model: nn.Module) -> LayerLayout:
    """Where every parameter of `model` sits relative to its transformer blocks."""
    prefix, blocks = find_layer_list(model)
    num_layers = len(blocks)
    block_of_parameter = {}
    for index, block in enumerate(blocks):
        for parameter in block.parameters():
            block_of_parameter[id(parameter)] = index
    head = head_names(model)
    position: dict[str, int] = {}
    seen_a_block = False
    for name, parameter in model.named_parameters():
        if name in head:
            position[name] = num_layers
        elif id(parameter) in block_of_parameter:
            position[name] = block_of_parameter[id(parameter)]
            seen_a_block = True
        else:
            # registration order: before the first block's parameters -> embeddings; after -> top
            position[name] = num_layers if seen_a_block else EMBEDDINGS
    return LayerLayout(prefix, num_layers, position, frozenset(head))


def resolve_layer_indices(option: str, indices: tuple[int, ...], num_layers: int, model_name: str) -> list[int]:
    """Block indices as typed (negative counts from the top, like Python) -> sorted indices in range.

    `option` is how the user wrote it (e.g. 'method.layers'), for the error message.
    """
    resolved, problems = set(), []
    for index in indices:
        if -num_layers <= index < num_layers:
            resolved.add(index % num_layers)
        else:
            problems.append(index)
    if problems:
        raise DeltatuneError(
            f"{option}={tuple(indices)}: {model_name} has {num_layers} transformer layers, so indices must be "
            f"in {-num_layers}..{num_layers - 1} (negative counts from the top); got {problems}."
        )
    return sorted(resolved)


def is_norm(module: nn.Module) -> bool:
    """LayerNorm or RMSNorm, torch's or a model family's own class (LlamaRMSNorm, T5LayerNorm, ...)."""
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return True
    return type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def describe_position(position: int, num_layers: int) -> str:
    """'embeddings', 'layer 3' or 'top' for a position in the stack."""
    if position == EMBEDDINGS:
        return "embeddings"
    if position == num_layers:
        return "top"
    return f"layer {position}"
