"""Merging deltas of one base model: model soups, task arithmetic, TIES and DARE.

    deltatune merge RUN_A RUN_B --how task-arithmetic --out runs/merged
    deltatune merge SEED_1 SEED_2 SEED_3 --how linear --out runs/soup --evaluate dev
    deltatune merge RUN --how task-arithmetic --weights 0.7 --out runs/wise-ft --evaluate dev

Every merge works on *task vectors*: what each delta changes, τ_i (a LoRA delta's s·B·A per layer, an
(IA)3 delta's scales minus one, a BitFit / LayerNorm / freeze / full delta's tensors minus the base
model's, a sparse mask's W⊙M − W). The merged delta is base + merge(τ_1 .. τ_n) with weights w_i:

    linear            Σ w_i τ_i, the weights normalised to sum to 1 (a model soup when the sources are
                      seeds of one task: Wortsman et al. 2022); default: equal weights
    task-arithmetic   Σ w_i τ_i, weights as given (default 1 each: Ilharco et al. 2023); one run with
                      weight w is base + w·τ, its head kept as trained: w in (0, 1) a point between
                      the base model and the run (WiSE-FT: Wortsman et al. 2022), w > 1 beyond the run
                      along its task vector (ExPO: Zheng et al. 2024)
    ties              keep each τ_i's `density` largest entries by magnitude, elect each entry's sign
                      from the sum of the trimmed vectors, average the weighted entries that agree with
                      it (Yadav et al. 2023; default density 0.2)
    dare              drop each entry with probability 1 − density and rescale the rest by 1/density,
                      then Σ w_i τ_i (Yu et al. 2024; default density 0.5; random, fixed by --seed)
    dare-ties         DARE's drop and rescale, then TIES's sign election and disjoint mean

What comes out keeps the sources' method where it can: LoRA under linear and task-arithmetic is exact
by concatenation (A = [A_1; ..; A_n], B = [w_1 s_1 B_1, .., w_n s_n B_n], rank Σ r_i); under TIES and
DARE the merged s·B·A is dense and is factored back by a truncated SVD at `rank` (default Σ r_i; the
relative error is recorded). A sparse mask merges into weights no mask can express, so it comes out
as a full fine-tuning delta. Adapters and prompt or prefix deltas are not changes of the base weights
and are refused, as are deltas of different base models or of different methods.

Heads are per task. Sources of one task (soups) get their heads averaged with the normalised weights;
sources of several tasks give one run directory per task, `OUT/<task>/`, holding the merged body and
that task's own head. Each output is an ordinary run directory: `deltatune eval` and `deltatune.load`
work on it.
"""

from __future__ import annotations

import argparse
import json
import operator
import typing
from dataclasses import dataclass, replace
from functools import reduce
from pathlib import Path
from typing import Literal

import torch

from deltatune.cli_options import add_switch
from deltatune.delta import (
    MANIFEST,
    TENSORS,
    load_checked_base,
    read_manifest,
    read_tensors,
    save_tensors,
    write_json_atomic,
)
from deltatune.errors import DeltatuneError
from deltatune.records import DeltaManifest
from deltatune.run_directory import staged_directory

MergeHow = Literal["linear", "task-arithmetic", "ties", "dare", "dare-ties"]
HOWS = typing.get_args(MergeHow)
MajoritySign = Literal["total", "frequency"]
DEFAULT_DENSITY = {"ties": 0.2, "dare": 0.5, "dare-ties": 0.5}
BASE_TENSOR_METHODS = ("bitfit", "layernorm", "freeze", "full")
"""Methods whose delta is the new values of base tensors: the task vector is their difference from the base."""
NOT_WEIGHT_CHANGES = ("houlsby", "pfeiffer", "prompt-tuning", "prefix-tuning", "input-dependent-prompt", "recursive-lm")


@dataclass(frozen=True)
class MergeConfig:
    how: MergeHow = "task-arithmetic"
    """linear, task-arithmetic, ties, dare or dare-ties (see the module docstring)."""
    weights: tuple[float, ...] | None = None
    """One weight per source (default: equal; normalised to sum to 1 for linear)."""
    density: float | None = None
    """ties / dare: the fraction of each task vector's entries kept (default: ties 0.2, dare 0.5)."""
    majority_sign: MajoritySign = "total"
    """ties / dare-ties sign election: 'total' (sign of the sum) or 'frequency' (the more common sign)."""
    seed: int = 0
    """dare / dare-ties: seed of the random drop."""
    rank: int | None = None
    """LoRA under ties / dare: rank of the merged update's SVD (default: the sum of the sources' ranks)."""

    def __post_init__(self) -> None:
        problems = []
        if self.how not in HOWS:
            problems.append(f"--how {self.how!r} must be one of {', '.join(HOWS)}")
        if self.density is not None and not 0 < self.density <= 1:
            problems.append(f"--density {self.density} must be in (0, 1]")
        if self.majority_sign not in typing.get_args(MajoritySign):
            problems.append(f"--majority-sign {self.majority_sign!r} must be 'total' or 'frequency'")
        if self.rank is not None and self.rank < 1:
            problems.append(f"--rank {self.rank} must be at least 1")
        if self.weights is not None and self.how == "linear" and sum(self.weights) <= 0:
            problems.append(f"--weights {list(self.weights)} must have a positive sum for linear (they are normalised)")
        if problems:
            raise DeltatuneError("; ".join(problems) + ".")

    @property
    def kept_fraction(self) -> float:
        return self.density if self.density is not None else DEFAULT_DENSITY.get(self.how, 1.0)


# ------------------------------------------------------------------------------ task vectors


def merge_task_vectors(
    vectors: list[torch.Tensor], weights: list[float], config: MergeConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The merged task vector of `vectors` (one per source, same shape) under `config.how`."""
    stacked = torch.stack([vector.double() for vector in vectors])
    scale = torch.tensor(weights, dtype=torch.float64).view(-1, *([1] * vectors[0].ndim))
    if config.how in ("linear", "task-arithmetic"):
        merged = (stacked * scale).sum(0)
    else:
        if config.how == "ties":
            stacked = torch.stack([keep_largest(vector, config.kept_fraction) for vector in stacked])
        else:
            stacked = torch.stack([drop_and_rescale(vector, config.kept_fraction, generator) for vector in stacked])
        if config.how == "dare":
            merged = (stacked * scale).sum(0)
        else:
            merged = disjoint_mean(stacked, scale, config.majority_sign)
    return merged.to(vectors[0].dtype)


def keep_largest(vector: torch.Tensor, density: float) -> torch.Tensor:
    """TIES's trim: the `density` fraction of entries largest in magnitude, the rest zero."""
    count = int(density * vector.numel())
    kept = torch.zeros(vector.numel(), dtype=vector.dtype)
    if count:
        chosen = torch.topk(vector.abs().reshape(-1), k=count).indices
        kept[chosen] = vector.reshape(-1)[chosen]
    return kept.view(vector.shape)


def drop_and_rescale(vector: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE: keep each entry with probability `density` and divide the kept ones by it."""
    mask = torch.bernoulli(torch.full(vector.shape, density, dtype=torch.float32), generator=generator)
    return vector * mask.to(vector.dtype) / density


def disjoint_mean(stacked: torch.Tensor, scale: torch.Tensor, majority_sign: str) -> torch.Tensor:
    """TIES's elect and merge: per entry, the sign of the sum (or the commoner sign) wins; the weighted
    entries of that sign are averaged over how many there are."""
    signs = stacked.sign()
    votes = stacked.sum(0) if majority_sign == "total" else signs.sum(0)
    elected = torch.where(votes >= 0, 1.0, -1.0).to(stacked.dtype)
    agree = (signs == elected).to(stacked.dtype)
    return (stacked * scale * agree).sum(0) / agree.sum(0).clamp(min=1.0)


# ---------------------------------------------------------------------------------- sources


@dataclass
class Source:
    directory: Path
    manifest: DeltaManifest
    tensors: dict[str, torch.Tensor]

    @property
    def method(self) -> str:
        return self.manifest.method

    @property
    def task_key(self) -> str:
        return json.dumps(self.manifest.task.to_dict(), sort_keys=True)


def read_sources(run_dirs: list[str | Path], how: str) -> list[Source]:
    """Every source read and checked together: one base, one method, a method that changes weights.

    One source is enough for task arithmetic (its task vector scaled: WiSE-FT); every other way needs two.
    """
    if not run_dirs or (len(run_dirs) < 2 and how != "task-arithmetic"):
        raise DeltatuneError(
            f"deltatune merge --how {how} needs at least two run directories, got {len(run_dirs)}; one run "
            "merges only with --how task-arithmetic --weights W (W < 1 moves it back toward the base model)."
        )
    sources = [
        Source(Path(directory), read_manifest(directory), read_tensors(Path(directory))) for directory in run_dirs
    ]
    from deltatune.heads import shared_head

    shared_head(
        [source.directory for source in sources],
        [source.manifest for source in sources],
        "deltatune merge",
        allow_bi_encoder=True,
    )
    problems = []
    fingerprints = {source.manifest.base_model.fingerprint for source in sources}
    if len(fingerprints) > 1:
        listing = ", ".join(
            f"{source.directory} ({source.manifest.base_model.name!r}, {source.manifest.base_model.fingerprint[:12]})"
            for source in sources
        )
        problems.append(
            f"the deltas were trained on different base models ({listing}); only deltas of one base model can be merged"
        )
    methods = sorted({source.method for source in sources})
    if len(methods) > 1:
        problems.append(
            f"the deltas are of different methods ({', '.join(methods)}); merge deltas of one method "
            "(their task vectors live in different places)"
        )
    refused = sorted(set(methods) & set(NOT_WEIGHT_CHANGES))
    if refused:
        problems.append(
            f"{refused[0]} deltas are not changes of the base model's weights (they add modules or "
            "tokens), so they cannot be merged; merge lora, ia3, bitfit, layernorm, freeze, full or "
            "sparse-mask deltas"
        )
    if not problems and methods[0] == "lora":
        targets = {tuple(source.manifest.method_config.get("targets", ())) for source in sources}
        if len(targets) > 1:
            problems.append(
                f"the LoRA deltas adapt different layers ({sorted(targets)}); merge LoRAs of one method.targets"
            )
    elif not problems and methods[0] not in ("sparse-mask",):
        configs = {json.dumps(source.manifest.method_config, sort_keys=True) for source in sources}
        if len(configs) > 1:
            problems.append(
                f"the {methods[0]} deltas have different method options ({sorted(configs)}); merge "
                "deltas trained with the same options"
            )
    if problems:
        raise DeltatuneError("Cannot merge: " + "; ".join(problems) + ".")
    return sources


# ------------------------------------------------------------------------------------ bodies


@dataclass
class Body:
    """The merged delta without its head: method, options, tensors, and facts for the record."""

    method: str
    method_config: dict
    tensors: dict[str, torch.Tensor]
    notes: dict


def merge_bodies(sources: list[Source], weights: list[float], config: MergeConfig, base) -> Body:
    """The sources' task vectors merged, in the form of their method (see the module docstring)."""
    from deltatune.methods.common import head_names

    head = head_names(base)
    order = {name: position for position, (name, _) in enumerate(base.named_parameters())}
    order.update(
        {
            f"{name}.{leaf}": position
            for position, (name, _) in enumerate(base.named_modules())
            for leaf in ("lora_A", "lora_B", "output_scale", "input_scale", "mask")
        }
    )
    names = sorted((name for name in sources[0].tensors if name not in head), key=lambda name: order.get(name, -1))
    generator = torch.Generator().manual_seed(config.seed)
    method = sources[0].method
    if method == "lora":
        return _merge_lora(sources, names, weights, config, generator)
    if method == "ia3":
        merged = {
            name: 1 + merge_task_vectors([source.tensors[name] - 1 for source in sources], weights, config, generator)
            for name in names
        }
        return Body("ia3", sources[0].manifest.method_config, merged, {})
    parameters = dict(base.named_parameters())
    if method == "sparse-mask":
        return _merge_masks(sources, names, weights, config, generator, parameters, head)
    missing = sorted({name for source in sources for name in source.tensors} - set(parameters))
    if method not in BASE_TENSOR_METHODS or missing:
        raise DeltatuneError(
            f"Cannot merge {method} deltas: their tensors {missing[:3]} are not tensors of the base "
            "model, so there is no base value to take their difference from."
        )
    merged = {}
    for name in names:
        original = parameters[name].detach()
        vectors = [source.tensors[name] - original for source in sources]
        merged[name] = original + merge_task_vectors(vectors, weights, config, generator)
    return Body(method, sources[0].manifest.method_config, merged, {})


def _merge_lora(
    sources: list[Source], names: list[str], weights: list[float], config: MergeConfig, generator: torch.Generator
) -> Body:
    modules = [name.removesuffix(".lora_A") for name in names if name.endswith(".lora_A")]
    scalings = [source.manifest.method_config["alpha"] / source.manifest.method_config["r"] for source in sources]
    ranks = [source.manifest.method_config["r"] for source in sources]
    merged, errors = {}, []
    if config.how in ("linear", "task-arithmetic"):  # exact: the updates side by side
        rank = sum(ranks)
        for module in modules:
            merged[f"{module}.lora_A"] = torch.cat([source.tensors[f"{module}.lora_A"] for source in sources])
            merged[f"{module}.lora_B"] = torch.cat(
                [
                    source.tensors[f"{module}.lora_B"] * weight * scaling
                    for source, weight, scaling in zip(sources, weights, scalings, strict=True)
                ],
                1,
            )
    else:
        rank = config.rank or sum(ranks)
        for module in modules:
            updates = [
                source.tensors[f"{module}.lora_B"].double() @ source.tensors[f"{module}.lora_A"].double() * scaling
                for source, scaling in zip(sources, scalings, strict=True)
            ]
            update = merge_task_vectors(updates, weights, config, generator)
            left, values, right = torch.linalg.svd(update, full_matrices=False)
            kept = min(rank, values.numel())
            down = torch.zeros(rank, update.shape[1], dtype=torch.float64)
            up = torch.zeros(update.shape[0], rank, dtype=torch.float64)
            down[:kept], up[:, :kept] = right[:kept], left[:, :kept] * values[:kept]
            norm = update.norm()
            errors.append(float((update - up @ down).norm() / norm) if norm > 0 else 0.0)
            dtype = sources[0].tensors[f"{module}.lora_A"].dtype
            merged[f"{module}.lora_A"], merged[f"{module}.lora_B"] = down.to(dtype), up.to(dtype)
    options = {**sources[0].manifest.method_config, "r": rank, "alpha": float(rank)}  # scaling 1: folded into B
    notes = {"svd_relative_error_max": max(errors)} if errors else {}
    return Body("lora", options, merged, notes)


def _merge_masks(
    sources: list[Source],
    names: list[str],
    weights: list[float],
    config: MergeConfig,
    generator: torch.Generator,
    parameters: dict,
    head: set[str],
) -> Body:
    """Sparse masks merge as weight differences W⊙M − W; the result is dense, so a full delta."""
    from deltatune.methods.sparse_mask import unpack_bits

    merged = {name: parameter.detach().clone() for name, parameter in parameters.items() if name not in head}
    for name in names:
        weight_name = name.removesuffix(".mask") + ".weight"
        weight = parameters[weight_name].detach()
        vectors = [torch.where(unpack_bits(source.tensors[name], weight.shape), 0.0, -weight) for source in sources]
        merged[weight_name] = weight + merge_task_vectors(vectors, weights, config, generator)
    return Body("full", {}, merged, {"from_method": "sparse-mask"})


def merge_heads(sources: list[Source], weights: list[float], head: set[str]) -> tuple[dict, list | None]:
    """The heads of sources of one task, averaged with normalised weights; and their regression scale.

    Sources whose regression scales differ have them folded into their heads first (the merged head
    then predicts task units, with the scale (0, 1)).
    """
    from deltatune.peft_export import fold_target_scale

    total = sum(weights)
    shares = [weight / total for weight in weights] if total else [1 / len(weights)] * len(weights)
    scales = [source.manifest.target_scale for source in sources]
    heads = [{name: tensor for name, tensor in source.tensors.items() if name in head} for source in sources]
    scale = scales[0]
    if any(value != scales[0] for value in scales):
        heads = [fold_target_scale(tensors, value) for tensors, value in zip(heads, scales, strict=True)]
        scale = [0.0, 1.0]
    # added left to right, as `sum` would: the merged head is the same to the last bit
    merged = {
        name: reduce(
            operator.add, [share * tensors[name].double() for share, tensors in zip(shares, heads, strict=True)]
        ).to(heads[0][name].dtype)
        for name in heads[0]
    }
    return merged, scale


# ------------------------------------------------------------------------------------ output


def merge_runs(run_dirs: list[str | Path], out: str | Path, config: MergeConfig | None = None) -> list[Path]:
    """Merge the deltas of `run_dirs` into new run directories; returns them (one per task of the sources).

    One task among the sources: `out` itself. Several: `out/<task>/` for each. Nothing is written
    unless everything succeeds; an existing `out` is never touched.
    """
    from deltatune.methods.common import head_names

    config = config or MergeConfig()
    out = Path(out)
    _check_new_directory(out)
    sources = read_sources(run_dirs, config.how)
    if config.weights is not None and len(config.weights) != len(sources):
        raise DeltatuneError(
            f"--weights gives {len(config.weights)} weight(s) for {len(sources)} run directories; give one per run."
        )
    weights = list(config.weights) if config.weights is not None else [1.0] * len(sources)
    if config.how == "linear":
        weights = [weight / sum(weights) for weight in weights]
    base, _ = load_checked_base(sources[0].manifest, fix="Merge on the original base.")
    body = merge_bodies(sources, weights, config, base)
    head = {name for name in head_names(base)}
    groups: dict[str, list[int]] = {}
    for position, source in enumerate(sources):
        groups.setdefault(source.task_key, []).append(position)
    written: list[Path] = []
    with staged_directory(
        out, frozenset(), False, what="the merged delta", check=lambda: _check_new_directory(out)
    ) as staging:
        for positions in groups.values():
            members = [sources[position] for position in positions]
            heads, scale = merge_heads(members, [weights[position] for position in positions], head)
            task_name = members[0].manifest.task.name
            directory = staging if len(groups) == 1 else staging / _directory_name(task_name, written)
            _write_merged(directory, members[0], body, heads, scale, sources, weights, config)
            written.append(directory.relative_to(staging))
    return [out / relative for relative in written]


def _check_new_directory(out: Path) -> None:
    """A merge writes only new directories: an existing `out` is never touched."""
    if out.exists():
        raise DeltatuneError(f"--out {out} already exists; choose a new directory for the merged delta.")


def _directory_name(task_name: str, taken: list[Path]) -> str:
    stem = "".join(character if character.isalnum() or character in "-_" else "-" for character in task_name) or "task"
    name, number = stem, 2
    while Path(name) in taken:
        name, number = f"{stem}-{number}", number + 1
    return name


def _write_merged(
    directory: Path,
    first: Source,
    body: Body,
    heads: dict,
    scale,
    sources: list[Source],
    weights: list[float],
    config: MergeConfig,
) -> None:
    from deltatune.model_card import write_model_card

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in {**body.tensors, **heads}.items()}
    save_tensors(tensors, directory / TENSORS, {"format": "deltatune", "method": body.method})
    record = {
        "how": config.how,
        "sources": [str(source.directory.resolve()) for source in sources],
        "source_tasks": [source.manifest.task.name for source in sources],
        "weights": weights,
        **({"density": config.kept_fraction} if config.how not in ("linear", "task-arithmetic") else {}),
        **({"majority_sign": config.majority_sign} if "ties" in config.how else {}),
        **({"seed": config.seed} if "dare" in config.how else {}),
        **body.notes,
    }
    manifest = DeltaManifest(
        method=body.method,
        method_config=body.method_config,
        base_model=first.manifest.base_model,
        task=first.manifest.task,
        head=first.manifest.head,
        data=first.manifest.data,
        max_length=first.manifest.max_length,
        target_scale=scale,
        metrics={},
        merge=record,
        versions=first.manifest.versions,
        delta_bytes=(directory / TENSORS).stat().st_size,
    )
    write_json_atomic(directory / MANIFEST, manifest.to_json())
    write_model_card(directory, manifest)


def evaluate_merge(merged: list[Path], run_dirs: list[str | Path], split: str, limit: int | None = None) -> list[dict]:
    """Each merged delta and each source delta of its task, on `split` of that task: rows for a report.

    The merged run's manifest (and model card) record its metrics on `split`.
    """
    import deltatune
    from deltatune.model_card import write_model_card

    rows = []
    for directory in merged:
        manifest = read_manifest(directory)
        metrics = deltatune.load(directory).evaluate(split, limit=limit)
        manifest = replace(manifest, metrics={**manifest.metrics, split: metrics})
        write_json_atomic(directory / MANIFEST, manifest.to_json())
        write_model_card(directory, manifest)
        how = (manifest.merge or {}).get("how")
        rows.append({"task": manifest.task.name, "delta": str(directory), "kind": f"merged ({how})", **metrics})
        for source in run_dirs:
            if read_manifest(source).task == manifest.task:
                rows.append(
                    {
                        "task": manifest.task.name,
                        "delta": str(source),
                        "kind": "own delta",
                        **deltatune.load(source).evaluate(split, limit=limit),
                    }
                )
    return rows


def format_report(rows: list[dict]) -> str:
    metrics = [key for key in rows[0] if key not in ("task", "delta", "kind")] if rows else []
    lines = ["| task | delta | kind | " + " | ".join(metrics) + " |", "|---|---|---|" + "---|" * len(metrics)]
    for row in rows:
        values = " | ".join(
            f"{row[key]:.4f}" if isinstance(row.get(key), float) else str(row.get(key, "-")) for key in metrics
        )
        lines.append(f"| {row['task']} | {row['delta']} | {row['kind']} | {values} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- CLI


def add_merge_parser(commands) -> None:
    merge = commands.add_parser(
        "merge",
        help="merge deltas of one base model (soups, task arithmetic, TIES, DARE)",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    merge.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    merge.add_argument("--how", default="task-arithmetic", choices=HOWS)
    merge.add_argument("--weights", help="one weight per run, comma-separated (default: equal)")
    merge.add_argument("--density", type=float, help="ties/dare: fraction of entries kept (default ties 0.2, dare 0.5)")
    merge.add_argument("--majority-sign", default="total", choices=typing.get_args(MajoritySign))
    merge.add_argument("--seed", type=int, default=0, help="dare: seed of the random drop")
    merge.add_argument(
        "--rank", type=int, help="LoRA under ties/dare: rank of the merged update (default: sum of ranks)"
    )
    merge.add_argument("--out", required=True, help="new directory for the merged run (or one per task inside it)")
    merge.add_argument("--evaluate", metavar="SPLIT", help="evaluate the merged and each source delta on this split")
    merge.add_argument("--eval-limit", type=int, help="with --evaluate: at most this many examples per task")
    add_switch(merge, "--json", help="print the rows as JSON")


def merge_command(args: argparse.Namespace) -> int:
    weights = None
    if args.weights:
        try:
            weights = tuple(float(value) for value in args.weights.split(","))
        except ValueError:
            raise DeltatuneError(
                f"--weights {args.weights!r} must be numbers separated by commas, e.g. 0.7,0.3."
            ) from None
    config = MergeConfig(
        how=args.how,
        weights=weights,
        density=args.density,
        majority_sign=args.majority_sign,
        seed=args.seed,
        rank=args.rank,
    )
    written = merge_runs(args.run_dirs, args.out, config)
    rows = evaluate_merge(written, args.run_dirs, args.evaluate, args.eval_limit) if args.evaluate else []
    if args.json:
        print(json.dumps({"merged": [str(path) for path in written], "evaluation": rows}, indent=2))
    else:
        print("merged into " + ", ".join(map(str, written)))
        if rows:
            print(format_report(rows))
    return 0


__all__ = [
    "HOWS",
    "MergeConfig",
    "add_merge_parser",
    "evaluate_merge",
    "merge_command",
    "merge_runs",
    "merge_task_vectors",
]
