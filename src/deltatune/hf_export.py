"""Export a run as a plain Hugging Face model: `deltatune export RUN --format hf --out DIR [--push-to-hub REPO]`.

The exported directory is what `transformers.pipeline("text-classification", model=DIR)` loads, with
no deltatune and no PEFT: the base model with the delta folded into its weights (LoRA's s·B·A added,
(IA)3's scales multiplied in, a sparse mask's zeros applied; BitFit, LayerNorm, freeze and full
fine-tuning deltas are new values of base tensors already), the task head, `id2label`/`label2id`,
for regression the target scale folded into the head (W·std, b·std + mean, so the raw output is the
score: call the pipeline with `function_to_apply="none"`), the tokenizer (its `model_max_length` set
to the length the delta was trained with, so `truncation=True` cuts where deltatune did), and a
model card. Methods that add modules the architecture lacks (adapters, prompts, prefixes, ...) cannot
be folded in and are refused, saying what to use instead.

`--push-to-hub REPO` uploads the exported directory with huggingface_hub's `HfApi` (create the repo
if needed, then `upload_folder`); the token comes from `--hub-token`, `HF_TOKEN` or `hf auth login`.
"""

from __future__ import annotations

import os
from pathlib import Path

from deltatune.errors import DeltatuneError
from deltatune.run_directory import protected_reason, staged_directory

EXPORT_RECORD = "deltatune_export.json"
"""Written into every export: what it was made from. An existing --out is replaced only if it holds one."""


def export_hf(run_dir: str | Path, out: str | Path, *, base: str | None = None, overwrite: bool = False) -> Path:
    """Write the run `run_dir` as a plain transformers model directory `out`; returns `out`."""
    import deltatune
    from deltatune.delta import read_manifest
    from deltatune.heads import foreign_head
    from deltatune.methods.state import sites

    out = Path(out)
    _check_destination(out, overwrite)
    problem = foreign_head(read_manifest(Path(run_dir)), run_dir, "an export to a plain transformers model")
    if problem is not None:
        raise DeltatuneError(problem)
    tuned = deltatune.load(run_dir, base=base)
    method = tuned.method
    if sites(tuned.model):
        if not method.mergeable:
            raise DeltatuneError(
                f"A {method.name!r} delta adds modules that {type(tuned.model).__name__} does not have, so it cannot be "
                "folded into plain transformers weights. Export lora or ia3 deltas with --format peft, or use the "
                "delta with deltatune itself (deltatune.load, deltatune serve)."
            )
        method.merge(tuned.model)
    plain = _plain_model(tuned)
    # an existing --out is checked again just before it is replaced: a file may have appeared there meanwhile
    with staged_directory(
        out, frozenset(), overwrite, what="the export", check=lambda: _check_destination(out, overwrite)
    ) as staging:
        plain.save_pretrained(staging, safe_serialization=True)
        tokenizer = tuned.tokenizer
        tokenizer.model_max_length = tuned.manifest.max_length
        tokenizer.save_pretrained(staging)
        _write_provenance(staging, tuned, Path(run_dir))
    return out


def _check_destination(out: Path, overwrite: bool) -> None:
    protected = protected_reason(out)
    if protected is not None:
        raise DeltatuneError(
            f"--out {out} is {protected}: an export is written into a directory of its own and "
            "replaces it, so deltatune never writes one there. Give a new directory, e.g. "
            "--out exports/NAME."
        )
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise DeltatuneError(
                f"--out {out} already exists; choose another directory, or pass --overwrite to "
                "replace an earlier export there."
            )
        if not (out / EXPORT_RECORD).is_file():
            raise DeltatuneError(
                f"--out {out} holds files that are not a deltatune export (no {EXPORT_RECORD}); "
                "deltatune replaces only what it wrote. Choose another directory."
            )


def _plain_model(tuned):
    """A fresh transformers model of the same class holding the base tensors (delta folded in) and the head."""
    from transformers import AutoModelForSequenceClassification

    from deltatune.methods.common import head_names
    from deltatune.methods.state import parameter_index
    from deltatune.peft_export import fold_target_scale

    model, task = tuned.model, tuned.task
    index = parameter_index(model)
    state = {canonical: parameter.detach().clone() for canonical, (_, parameter) in index.base.items()}
    scale = tuned.manifest.target_scale
    if scale:
        head = {index.canonical[name] for name in head_names(model)}
        state.update(fold_target_scale({name: state[name] for name in head}, scale))
    labels = task.labels if not task.is_regression else ("score",)
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: position for position, label in enumerate(labels)}
    config.problem_type = "regression" if task.is_regression else "single_label_classification"
    config.architectures = [type(model).__name__]
    plain = AutoModelForSequenceClassification.from_config(config)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    persistent = {name for name, _ in plain.named_parameters()} | set(plain.state_dict())
    missing = [name for name in missing if name in persistent and name not in state]
    if missing or unexpected:
        raise DeltatuneError(
            f"The exported model does not line up with {type(model).__name__} (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}); please report this with your transformers version."
        )
    return plain.eval()


def _write_provenance(directory: Path, tuned, run_dir: Path) -> None:
    from deltatune.delta import write_json_atomic
    from deltatune.model_card import write_model_card
    from deltatune.records import read_run_record
    from deltatune.sources.records import RUN_RECORD

    manifest = tuned.manifest
    written = manifest.to_json()
    write_json_atomic(
        directory / EXPORT_RECORD,
        {
            "source_run": str(run_dir.resolve()),
            "method": manifest.method,
            "base_model": written["base_model"],
            "task": written["task"],
            "target_scale_folded": manifest.target_scale,
            "max_length": manifest.max_length,
        },
    )
    # merged deltas have no run record, and a FreeLM run's is of its own kind
    has_record = (run_dir / RUN_RECORD).is_file() and not manifest.is_freelm
    record = read_run_record(run_dir) if has_record else None
    write_model_card(directory, manifest, record, library="transformers")


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
):
    """Upload `folder` to the hub model repository `repo_id` (created if missing); returns the commit info."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not any((folder / name).is_file() for name in ("config.json", "adapter_config.json")):
        raise DeltatuneError(
            f"{folder} has neither config.json nor adapter_config.json: push an exported directory "
            "(deltatune export --format hf or --format peft)."
        )
    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise DeltatuneError(f"--push-to-hub {repo_id!r} must be a hub repository id 'owner/name'.")
    api = HfApi(token=token)
    api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        repo_type="model",
        folder_path=str(folder),
        commit_message=commit_message or f"Upload {folder.name} exported by deltatune",
    )


def export_command(args) -> int:
    """`deltatune export --format hf|peft [--push-to-hub REPO]`."""
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise DeltatuneError(f"--out {args.out} is a file, not a directory. Give a directory for the export.")
    try:
        if args.format == "hf":
            out = export_hf(args.run_dir, args.out, overwrite=args.overwrite)
            print(f"wrote a transformers model to {out}: pipeline('text-classification', model={str(out)!r})")
        else:
            from deltatune.peft_export import export_peft

            out = export_peft(
                args.run_dir, args.out, base_model_name_or_path=args.base_model_name_or_path, overwrite=args.overwrite
            )
            print(
                f"wrote a PEFT adapter to {out}: load it with peft.PeftModel.from_pretrained(base_model, {str(out)!r})"
            )
    except OSError as error:
        raise DeltatuneError(
            f"Cannot write the export to --out {args.out}: {error.strerror or error}. Give a "
            "directory you can write to."
        ) from None
    if args.push_to_hub:
        push_to_hub(out, args.push_to_hub, token=args.hub_token or os.environ.get("HF_TOKEN"), private=args.private)
        print(f"uploaded to https://huggingface.co/{args.push_to_hub}")
    return 0


def add_hf_export_options(export) -> None:
    """The options `deltatune export` gains for --format hf."""
    export.add_argument(
        "--push-to-hub",
        metavar="REPO",
        help="upload the export to this hub repository ('owner/name', created if missing)",
    )
    export.add_argument("--hub-token", help="token for --push-to-hub (default: HF_TOKEN or `hf auth login`)")
    from deltatune.cli_options import add_switch

    add_switch(export, "--private", help="with --push-to-hub: create the repository private")


__all__ = ["EXPORT_RECORD", "add_hf_export_options", "export_command", "export_hf", "push_to_hub"]
