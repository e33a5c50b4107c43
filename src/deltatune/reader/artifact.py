"""A frozen-reader run from names to a saved directory, loading it back, and evaluating it.

The directory holds `reader.safetensors` (the soft prompt and the re-ranker: the only trained tensors)
and `reader.json` (configuration, the base decoder's name and weights digest, the data, the training
summary). Loading rebuilds the reader on the named decoder and refuses a decoder whose weights differ.

Evaluation answers the same questions with several systems on one frozen decoder:
  closed-book   the decoder alone, the question only;
  open-book     the decoder reading BM25's top-k passages, nothing trained;
  bm25-reader   the trained soft prompt reading BM25's top-k, without the re-ranker;
  reader        the trained run: re-ranked passages and its soft prompt;
  and any other saved runs passed as `against` (e.g. a closed-book prompt-tuning run, top_k 0).
Each gets exact match and F1 with a 95% bootstrap interval over questions, and the reader's paired
difference to each other system.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from deltatune.config import to_jsonable
from deltatune.delta import save_tensors, write_json_atomic
from deltatune.errors import DeltatuneError
from deltatune.reader.config import ReaderConfig
from deltatune.reader.data import QADataset
from deltatune.reader.model import Reranker, SoftPrompt, frozen_weights_digest
from deltatune.reader.pipeline import (
    CLOZE_QUESTION_TEMPLATE,
    DEFAULT_QUESTION_TEMPLATE,
    FrozenReader,
    answer_questions,
    score_answers,
    train_reader,
)
from deltatune.reader.retrieval import BM25Index
from deltatune.run import git_state, library_versions
from deltatune.run_directory import locked_target, staged_directory

MANIFEST = "reader.json"
TENSORS = "reader.safetensors"
KIND = "frozen-reader"
SYSTEMS = ("closed-book", "open-book", "bm25-reader")
READER_FILES = frozenset({MANIFEST, TENSORS})
"""Every file a reader directory holds: `--overwrite` replaces a directory only if it holds nothing else."""


def load_qa_data(
    data: str, hub_splits: tuple[str, ...] = ("train", "validation"), max_hub_examples: int | None = None
) -> QADataset:
    """'wikitext-cloze' (offline), a local .jsonl file (its one split is 'test'), or a hub id ('hub:ID')."""
    from deltatune.reader.cloze import NAME, load_wikitext_cloze
    from deltatune.reader.data import load_qa_hub, load_qa_jsonl

    if data == NAME:
        return load_wikitext_cloze()
    if data.startswith("hub:"):
        return load_qa_hub(data[len("hub:") :], hub_splits, max_examples=max_hub_examples)
    if data.endswith(".jsonl"):
        return load_qa_jsonl(data)
    raise DeltatuneError(
        f"--data {data!r}: pass {NAME} (offline cloze over WikiText-2), a local .jsonl file, or "
        "hub:ID for a SQuAD-style hub set (e.g. hub:rajpurkar/squad)."
    )


def question_template_for(dataset: QADataset) -> str:
    from deltatune.reader.cloze import NAME

    return CLOZE_QUESTION_TEMPLATE if dataset.name == NAME else DEFAULT_QUESTION_TEMPLATE


def run_reader_training(
    model_name: str,
    data: str,
    config: ReaderConfig | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    dataset: QADataset | None = None,
) -> dict:
    """Train a frozen reader on `data` over the decoder `model_name`; save it to `out`; return the record."""
    config = config or ReaderConfig()
    if out is None:
        return _train_and_save(model_name, data, config, None, overwrite, dataset)
    with locked_target(Path(out), READER_FILES, overwrite) as out_path:
        return _train_and_save(model_name, data, config, out_path, overwrite, dataset)


def _train_and_save(
    model_name: str, data: str, config: ReaderConfig, out_path: Path | None, overwrite: bool, dataset: QADataset | None
) -> dict:
    """Train the reader and, with `out_path` (locked by the caller), publish it there; returns the record."""
    from deltatune.sources.models import load_causal_lm

    if config.threads:
        torch.set_num_threads(config.threads)
    dataset = dataset or load_qa_data(data)
    causal_lm, tokenizer = load_causal_lm(model_name)
    reader = FrozenReader(causal_lm, tokenizer, config, question_template_for(dataset))
    index = BM25Index(dataset.passages) if config.top_k else None
    summary = train_reader(reader, dataset, index)
    tensors = {name: tensor.detach().contiguous().clone() for name, tensor in reader.trained_parameters().items()}
    record = {
        "kind": KIND,
        "model": model_name,
        "data": data,
        "data_provenance": dataset.provenance,
        "question_template": reader.question_template,
        "config": to_jsonable(config),
        "trainable_params": sum(t.numel() for t in tensors.values()),
        "decoder_params": sum(p.numel() for p in causal_lm.parameters()),
        "training": summary,
        "versions": asdict(library_versions()),
        "git": asdict(git_state()),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if out_path is not None:
        _publish(out_path, tensors, record, overwrite)
        record["delta_bytes"] = (out_path / TENSORS).stat().st_size
    return record


def _publish(out_path: Path, tensors: dict[str, torch.Tensor], record: dict, overwrite: bool = False) -> None:
    with staged_directory(out_path, READER_FILES, overwrite, what="the reader") as staging:
        save_tensors(tensors, staging / TENSORS, {"format": "deltatune", "kind": KIND})
        write_json_atomic(staging / MANIFEST, record)


def read_reader_manifest(directory: str | Path) -> dict:
    import json

    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise DeltatuneError(
            f"{directory} has no {MANIFEST}: it is not a frozen-reader run. Pass the --out "
            "directory of `deltatune reader train`."
        )
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("kind") != KIND:
        raise DeltatuneError(f"{path} is not a frozen-reader manifest (kind {manifest.get('kind')!r}).")
    return manifest


def load_reader(directory: str | Path, causal_lm=None, tokenizer=None) -> FrozenReader:
    """The saved reader on its base decoder (loaded by name unless given); the decoder must be the one it
    was trained on, bit for bit."""
    from deltatune.sources.models import load_causal_lm

    manifest = read_reader_manifest(directory)
    if causal_lm is None:
        causal_lm, tokenizer = load_causal_lm(manifest["model"])
    expected = manifest["training"]["decoder_weights_sha256"]
    if frozen_weights_digest(causal_lm) != expected:
        raise DeltatuneError(
            f"The reader in {directory} was trained on {manifest['model']!r} with weights digest "
            f"{expected[:12]}; the decoder given differs. Load it onto that decoder."
        )
    config = ReaderConfig(**manifest["config"])
    reader = FrozenReader(causal_lm, tokenizer, config, manifest["question_template"])
    reader.freeze_decoder()
    tensors = load_file(str(Path(directory) / TENSORS))
    if "prompt.vectors" in tensors:
        reader.prompt = SoftPrompt(causal_lm.get_input_embeddings(), [0], tensors["prompt.vectors"].shape[0])
        reader.prompt.vectors.data.copy_(tensors["prompt.vectors"])
    if "reranker.projection" in tensors:
        reader.reranker = Reranker(tensors["reranker.projection"].shape[1], tensors["reranker.projection"].shape[0])
        reader.reranker.load_state_dict(
            {name[len("reranker.") :]: value for name, value in tensors.items() if name.startswith("reranker.")}
        )
    return reader


def bootstrap_mean_interval(values: np.ndarray, samples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean of per-question scores (or of paired per-question differences)."""
    values = np.asarray(values, dtype=np.float64)
    if not len(values):
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(samples, len(values)))].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return float(low), float(high)


def evaluate_reader(
    directory: str | Path,
    split: str = "test",
    baselines: tuple[str, ...] = SYSTEMS,
    against: tuple[str, ...] = (),
    max_examples: int | None = None,
    data: str | None = None,
    log=None,
) -> dict:
    """Exact match and F1 of the reader and its baselines on `split`; see the module docstring."""
    manifest = read_reader_manifest(directory)
    unknown = [name for name in baselines if name not in SYSTEMS]
    if unknown:
        raise DeltatuneError(f"Unknown baseline(s) {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}.")
    log = log or (lambda message: None)
    reader = load_reader(directory)
    dataset = load_qa_data(data or manifest["data"])
    config = reader.config
    examples = list(dataset.split(split))
    count = max_examples if max_examples is not None else config.eval_examples
    if count:
        rng = np.random.default_rng(config.seed)
        examples = [examples[i] for i in sorted(rng.permutation(len(examples))[:count])]
    top_k = config.top_k or 3
    index = BM25Index(dataset.passages)
    systems: dict[str, dict] = {}

    def run(name: str, target: FrozenReader, k: int, use_prompt: bool, use_reranker: bool) -> None:
        log(f"{name}: {len(examples)} questions, {k} passages")
        started = time.perf_counter()
        predictions, facts = answer_questions(target, dataset, examples, index, k, use_prompt, use_reranker)
        scores = score_answers(predictions, examples)
        systems[name] = {**scores, **facts, "time_s": time.perf_counter() - started, "predictions": predictions[:20]}

    if "closed-book" in baselines:
        run("closed-book", reader, 0, False, False)
    if "open-book" in baselines:
        run("open-book", reader, top_k, False, False)
    if "bm25-reader" in baselines and config.top_k:
        run("bm25-reader", reader, top_k, True, False)
    run("reader", reader, config.top_k, True, True)
    for other in against:
        other_reader = load_reader(other, reader.causal_lm, reader.tokenizer)
        run(f"run:{Path(other).name}", other_reader, other_reader.config.top_k, True, True)
    return _report(manifest, directory, split, examples, systems)


def _report(manifest: dict, directory, split: str, examples: list, systems: dict[str, dict]) -> dict:
    reader_scores = systems["reader"]["per_question"]
    for name, system in systems.items():
        for metric in ("exact_match", "f1"):
            system[f"{metric}_interval"] = bootstrap_mean_interval(np.array(system["per_question"][metric]))
            if name != "reader":
                difference = np.array(reader_scores[metric]) - np.array(system["per_question"][metric])
                system[f"reader_minus_this_{metric}"] = float(difference.mean())
                system[f"reader_minus_this_{metric}_interval"] = bootstrap_mean_interval(difference)
    return {
        "reader": str(directory),
        "model": manifest["model"],
        "data": manifest["data"],
        "split": split,
        "num_questions": len(examples),
        "config": manifest["config"],
        "training": {key: value for key, value in manifest["training"].items() if key != "prompt_losses"},
        "systems": systems,
    }


def format_report(report: dict) -> str:
    lines = [
        f"{report['data']} {report['split']}: {report['num_questions']} questions; decoder {report['model']} (frozen)",
        "",
        f"{'system':<24} {'EM':>22} {'F1':>22}  answer in passages",
    ]
    for name, system in report["systems"].items():
        cells = []
        for metric in ("exact_match", "f1"):
            low, high = system[f"{metric}_interval"]
            cells.append(f"{100 * system[metric]:6.2f} [{100 * low:5.2f}, {100 * high:5.2f}]")
        found = system.get("answer_in_passages")
        lines.append(f"{name:<24} {cells[0]:>22} {cells[1]:>22}  {'-' if found is None else f'{100 * found:.1f}%'}")
    lines.append("")
    lines.append("EM and F1 in points with 95% bootstrap intervals over questions.")
    for name, system in report["systems"].items():
        if name != "reader":
            low, high = system["reader_minus_this_exact_match_interval"]
            lines.append(
                f"reader - {name}: EM {100 * system['reader_minus_this_exact_match']:+.2f} "
                f"[{100 * low:+.2f}, {100 * high:+.2f}], F1 {100 * system['reader_minus_this_f1']:+.2f} "
                f"[{100 * system['reader_minus_this_f1_interval'][0]:+.2f}, "
                f"{100 * system['reader_minus_this_f1_interval'][1]:+.2f}]"
            )
    return "\n".join(lines)


__all__ = [
    "KIND",
    "SYSTEMS",
    "bootstrap_mean_interval",
    "evaluate_reader",
    "format_report",
    "load_qa_data",
    "load_reader",
    "read_reader_manifest",
    "run_reader_training",
]
