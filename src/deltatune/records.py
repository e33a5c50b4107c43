"""What a run directory says about itself, typed: the run record (`run.json`) and the delta manifest
(`deltatune.json`).

Both are frozen dataclasses. `to_json()` gives the strict-JSON object that is written (the keys are the
fields, in order; an optional field that is None is left out, as deltatune always has); `from_json(path)`
reads a file back and is the only way in:

- the run record carries `schema_version`. A record without one was written before the key existed
  (version 1): keys added since then take their defaults, keys dropped since then are ignored.
  Version 2 records hold every key.
- the manifest's version is its `format_version` (the key every deltatune release has checked, so an
  older release still refuses a newer manifest).
- a version newer than this deltatune knows, a file that is not JSON, a missing key or a value of the
  wrong kind is a `DeltatuneError` naming the file, what is wrong and what to do.

Parts with a fixed shape are dataclasses of their own (the head, the device, the processes, the git
state, the library versions, the base model, the training configuration, the task); parts whose shape
belongs to someone else stay plain JSON: a method's options and report, a data record
(`deltatune.sources.records`), data provenance (each source says where its examples came from in its own
words), metrics by name, the learning curve and the learning-rate search.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from deltatune.config import build_config, json_ready
from deltatune.errors import DeltatuneError
from deltatune.heads import LEGACY_HEAD, HeadConfig
from deltatune.tasks.spec import TaskSpec
from deltatune.training import TrainConfig

RECORD_VERSION = 2
"""Schema version of the run records this deltatune writes (a record without `schema_version` is version 1)."""
MANIFEST_VERSION = 1
"""Format version of the manifests this deltatune writes (`format_version`)."""

Json = dict[str, Any]


@dataclass(frozen=True)
class GitState:
    """The deltatune source tree a run used."""

    commit: str | None = None
    """The commit (None when deltatune was not run from a git checkout)."""
    dirty: bool | None = None
    """Whether the tree had local changes."""


@dataclass(frozen=True)
class Versions:
    """Library and machine versions at the time of a run (each None where an older record lacks it)."""

    deltatune: str | None = None
    """deltatune's own version."""
    python: str | None = None
    """The Python version."""
    torch: str | None = None
    """PyTorch's version."""
    transformers: str | None = None
    """transformers' version."""
    numpy: str | None = None
    """numpy's version."""
    platform: str | None = None
    """The operating system, as `platform.platform()` says."""
    processor: str | None = None
    """The machine architecture."""
    cpu_count: str | None = None
    """How many CPUs the machine had."""


@dataclass(frozen=True)
class DeviceRecord:
    """Where a run computed."""

    device: str
    """The torch device ('cpu', 'cuda:0', 'mps')."""
    name: str
    """The device's model name."""
    precision: str
    """The precision training ran at (fp32, bf16, fp16)."""
    memory_bytes: int | None = None
    """A CUDA device's total memory (left out on other devices)."""

    OMITTED_WHEN_NONE: ClassVar[frozenset[str]] = frozenset({"memory_bytes"})


@dataclass(frozen=True)
class ProcessesRecord:
    """How many processes trained together."""

    processes: int
    """The world size (1 for a single process)."""
    backend: str
    """The collective backend (gloo, nccl) or 'none'."""
    fsdp: bool | None = None
    """True when the model was sharded over the processes (FSDP); left out otherwise."""

    OMITTED_WHEN_NONE: ClassVar[frozenset[str]] = frozenset({"fsdp"})


@dataclass(frozen=True)
class BaseModelRecord:
    """The base model a delta needs."""

    name: str
    """Its recorded name: an alias, a hub id or an absolute directory."""
    fingerprint: str
    """sha256 of its pretrained weights, head excluded (`deltatune.delta.fingerprint_backbone`)."""
    source: str | None = None
    """What the name is and where its files live, in words."""
    total_params: int | None = None
    """Parameters of the task model built on it."""
    given: str | None = None
    """The name as the user gave it, when it was recorded differently."""

    OMITTED_WHEN_NONE: ClassVar[frozenset[str]] = frozenset({"source", "total_params", "given"})
    """Keys written only when they hold something (FreeLM and merged deltas never had some of them)."""


@dataclass(frozen=True)
class ManifestHead:
    """The task head a delta was trained with: what the base must be loaded with."""

    kind: str
    """'cross-encoder' or 'bi-encoder'."""
    pooling: str
    """'cls', 'mean', 'last' or 'native'."""
    transformers_head: bool = True
    """True for the model family's own head; False for deltatune's pooled head."""


LEGACY_MANIFEST_HEAD = ManifestHead(LEGACY_HEAD["kind"], LEGACY_HEAD["pooling"])
"""The head of a delta saved before heads were configurable: transformers' own classification head."""


@dataclass(frozen=True, kw_only=True)
class RunRecord:
    """`run.json`: everything needed to trust one training run and to train it again."""

    schema_version: int = RECORD_VERSION
    """The record's schema version (see the module docstring)."""
    model: str
    """The base model as recorded (an alias, a hub id, or an absolute directory)."""
    model_source: str | None = None
    """What the model name is and where its files live, in words."""
    model_fingerprint: str | None = None
    """sha256 of the base model's pretrained weights, head excluded."""
    task: str
    """The task's name."""
    data: Json
    """The data record the run trained on (`deltatune.data_record`)."""
    data_fingerprint: str | None = None
    """sha256 of the examples of every split."""
    data_provenance: Json = field(default_factory=dict)
    """Where every example came from, in the source's own words."""
    method: str
    """The method's registered name."""
    method_config: Json
    """The method's resolved options."""
    method_report: Json = field(default_factory=dict)
    """What the method says about itself after training (e.g. a sparse mask's density)."""
    regime_report: Json | None = None
    """What a training regime did (`--regime`: e.g. a surgical probe's scores); left out for standard training."""
    head: HeadConfig | None = None
    """The task head and why it was chosen (None in records from before heads were configurable)."""
    train_config: TrainConfig
    """The fully resolved training configuration."""
    num_train_examples: int
    """Training examples used."""
    num_truncated: dict[str, int] = field(default_factory=dict)
    """Per split, how many examples were longer than max_length."""
    trainable_params: int
    """Parameters that trained."""
    total_params: int
    """Parameters of the whole task model."""
    trainable_percent: float
    """100 * trainable / total."""
    full_model_bytes: int
    """Bytes the whole model's tensors take: what a full checkpoint would store."""
    dev_metrics: dict[str, float]
    """Dev metrics of the kept state (null where a metric was undefined)."""
    test_metrics: dict[str, float] | None = None
    """Test metrics of the kept state; None when the task has no test split."""
    evaluation_split: str = "dev"
    """The split the headline metric comes from: 'test' when there is one."""
    primary_metric: str
    """The metric early stopping and checkpoint selection follow."""
    learning_rate: float
    """The peak learning rate used (the chosen one after a search)."""
    lr_search: Json | None = None
    """The learning-rate search: candidates, their rung scores, the chosen rate (None without a search)."""
    best_step: int
    """The step of the kept (best dev) state."""
    steps: int
    """Optimizer steps taken."""
    planned_steps: int | None = None
    """Steps the budget allowed."""
    stopped_by: str
    """What ended training: epochs, min_steps, max_steps, time_budget, early_stopping or diverged."""
    converged: bool = True
    """False when the dev curve was still rising at the end."""
    last_gain: float | None = None
    """How much the best of the last two evaluations beat every earlier one (`training.still_improving`)."""
    examples_seen: int
    """Training examples processed, repeats counted."""
    train_time_s: float
    """Seconds spent training."""
    eval_time_s: float
    """Seconds spent evaluating."""
    train_examples_per_s: float | None
    """Training throughput."""
    train_real_tokens_per_s: float | None = None
    """Non-padding tokens per second of training."""
    padding_efficiency: float | None = None
    """Real tokens / all tokens in the training batches."""
    precision: str | None = None
    """The precision training ran at."""
    wall_time_s: float
    """Seconds the whole run took, loading included."""
    peak_memory_bytes: int | None = None
    """The process's peak resident memory."""
    device: DeviceRecord | None = None
    """Where it computed (None in records from before devices were recorded)."""
    peak_device_memory_bytes: int | None = None
    """Peak memory on an accelerator (None on a CPU)."""
    distributed: ProcessesRecord | None = None
    """How many processes trained together."""
    learning_curve: list[Json] = field(default_factory=list)
    """One entry per evaluation: step, examples seen, seconds so far, dev metrics."""
    versions: Versions = field(default_factory=Versions)
    """Library and machine versions."""
    git: GitState = field(default_factory=GitState)
    """The deltatune commit and whether it had local changes."""
    finished_at: str | None = None
    """When the run finished (local time, ISO 8601)."""
    model_as_given: str | None = None
    """The model name as the user gave it, when it was recorded differently (left out when the same)."""
    max_length_requested: int | None = None
    """The max_length asked for, when it was capped at the model's positions (left out otherwise)."""
    diverged: str | None = None
    """How training diverged, when it did (left out otherwise)."""
    delta_bytes: int | None = None
    """Bytes of delta.safetensors (None when nothing was saved)."""
    non_finite_values: dict[str, str] | None = None
    """Where the file held NaN or infinite numbers, written as null (left out when none)."""

    OMITTED_WHEN_NONE: ClassVar[frozenset[str]] = frozenset(
        {"model_as_given", "max_length_requested", "diverged", "non_finite_values", "regime_report"}
    )
    """Keys written only when they hold something (records never had them otherwise)."""

    def to_json(self) -> Json:
        """The record as the JSON object `run.json` holds."""
        return _to_json(self)

    @classmethod
    def from_json(cls, path: str | Path) -> RunRecord:
        """The record in `path` (a `run.json`); see the module docstring for which versions are read."""
        path = Path(path)
        data = _read_object(path, "the run record", "Train the run again, or restore the file from a copy")
        version = data.get("schema_version", 1)
        _check_version(
            path, "schema_version", version, RECORD_VERSION, "Train the run again, or restore the file from a copy"
        )
        data = {**data, "schema_version": RECORD_VERSION} if version == 1 else data
        return _decode(
            cls,
            data,
            path,
            strict=version == RECORD_VERSION,
            fix="Train the run again, or restore the file from a copy",
        )

    @property
    def display_model(self) -> str:
        """The model name as the user gave it."""
        return self.model_as_given or self.model


@dataclass(frozen=True, kw_only=True)
class DeltaManifest:
    """`deltatune.json`: what rebuilds base + delta, checks the data, and says what the delta is."""

    format_version: int = MANIFEST_VERSION
    """The manifest's format (schema) version."""
    method: str
    """The method's registered name."""
    method_config: Json
    """The method's resolved options."""
    base_model: BaseModelRecord
    """The base model the delta needs."""
    task: TaskSpec
    """The task spec, labels included."""
    data: Json | None = None
    """The data record the delta was trained on."""
    data_fingerprint: str | None = None
    """sha256 of the examples (older deltas keep it only in run.json)."""
    data_files: dict[str, Json] | None = None
    """Per split, the local file and its sha256 (empty for catalog data)."""
    max_length: int = 128
    """Tokens per text the delta was trained with."""
    target_scale: list[float] | None = None
    """A regression head's (offset, scale) into task units; None for classification."""
    head: ManifestHead | None = None
    """The task head (None in deltas from before heads were configurable: transformers' own)."""
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    """Metrics by split."""
    learning_rate: float | None = None
    """The peak learning rate used."""
    merge: Json | None = None
    """For a merged delta: how it was merged and from which runs."""
    freelm: Json | None = None
    """For a FreeLM run: its configuration, training tasks, training summary and perplexities."""
    versions: Versions = field(default_factory=Versions)
    """Library and machine versions when the delta was written."""
    delta_bytes: int | None = None
    """Bytes of delta.safetensors."""
    non_finite_values: dict[str, str] | None = None
    """Where the file held NaN or infinite numbers, written as null (left out when none)."""

    OMITTED_WHEN_NONE: ClassVar[frozenset[str]] = frozenset(
        {"data_fingerprint", "data_files", "head", "learning_rate", "merge", "freelm", "non_finite_values"}
    )
    """Keys written only when they hold something (merged and FreeLM deltas never had some of them)."""

    def to_json(self) -> Json:
        """The manifest as the JSON object `deltatune.json` holds."""
        return _to_json(self)

    @classmethod
    def from_json(cls, path: str | Path) -> DeltaManifest:
        """The manifest in `path` (a `deltatune.json`)."""
        path = Path(path)
        fix = "Re-create the delta by training again, or restore the file from a copy"
        data = _read_object(path, "the delta manifest", fix)
        if "format_version" not in data:
            raise DeltatuneError(
                f"{path} lacks the key format_version; it was not written by deltatune or has been edited. {fix}."
            )
        _check_version(path, "format_version", data["format_version"], MANIFEST_VERSION, fix)
        return _decode(cls, data, path, strict=False, fix=fix)

    @property
    def resolved_head(self) -> ManifestHead:
        """The head the base must be loaded with (transformers' own for deltas that do not record one)."""
        return self.head or LEGACY_MANIFEST_HEAD

    @property
    def is_freelm(self) -> bool:
        """Whether this is a `deltatune freelm train` run."""
        return (self.freelm or {}).get("kind") == "freelm"

    def training_data(self, directory: str | Path) -> Json:
        """The data record the delta was trained on (`directory` holds it); an error when it records none."""
        if self.data is None:
            raise DeltatuneError(
                f"{Path(directory) / 'deltatune.json'} records no training data, so there is nothing "
                "to evaluate on. Evaluate the runs it was made from."
            )
        return self.data

    def recorded_data(self, directory: str | Path) -> tuple[str | None, dict[str, Json]]:
        """The data fingerprint and local files ({split: {path, sha256}}) the run recorded; deltas from before
        the manifest held them keep them in `run.json` beside it (nothing is recorded when that is unreadable)."""
        if self.data_fingerprint:
            return self.data_fingerprint, self.data_files or {}
        try:
            record = read_run_record(directory)
        except DeltatuneError:
            return None, {}
        return record.data_fingerprint, record.data_provenance.get("files") or {}


# ---------------------------------------------------------------------------- writing


def _to_json(value: Any) -> Any:
    """A record's fields as JSON values, in field order; its `OMITTED_WHEN_NONE` fields left out when None."""
    if isinstance(value, TrainConfig):
        return json_ready(dataclasses.asdict(value))
    if isinstance(value, TaskSpec):
        return json_ready(value.to_dict())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        omitted: frozenset[str] = getattr(value, "OMITTED_WHEN_NONE", frozenset())
        return {
            item.name: _to_json(getattr(value, item.name))
            for item in dataclasses.fields(value)
            if not (item.name in omitted and getattr(value, item.name) is None)
        }
    return json_ready(value)


# ---------------------------------------------------------------------------- reading


def _read_object(path: Path, what: str, fix: str) -> Json:
    if not path.is_file():
        raise DeltatuneError(f"{path} does not exist or is not a file, so {what} cannot be read. {fix}.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DeltatuneError(f"{path} is corrupt ({error}). {fix}.") from None
    if not isinstance(data, dict):
        raise DeltatuneError(f"{path} holds a JSON {type(data).__name__}, not {what}'s object. {fix}.")
    return data


def _check_version(path: Path, key: str, version: Any, newest: int, fix: str) -> None:
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise DeltatuneError(
            f"{path} is damaged ({key} {version!r} is not a positive whole number); it was not "
            f"written by this deltatune or has been edited. {fix}."
        )
    if version > newest:
        raise DeltatuneError(
            f"{path} has {key} {version}, newer than this deltatune understands ({newest}): a "
            "newer deltatune wrote it. Upgrade deltatune (pip install -U deltatune) to read it."
        )


def _decode(cls: type, data: Json, path: Path, strict: bool, fix: str) -> Any:
    """An instance of the record class `cls` from `data`; every problem collected and raised once."""
    problems: list[str] = []
    value = _decode_dataclass(cls, data, "", problems, strict)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise DeltatuneError(
            f"{path} is damaged ({shown}); it was not written by this deltatune or has been edited. {fix}."
        )
    return value


def _decode_dataclass(cls: type, data: Any, where: str, problems: list[str], strict: bool) -> Any:
    if not isinstance(data, dict):
        problems.append(f"{where or 'the file'} is {_kind(data)}, not an object")
        return None
    hints = typing.get_type_hints(cls)
    already = len(problems)
    fields = {item.name: item for item in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for name, item in fields.items():
        if name in data:
            values[name] = _decode_value(hints[name], data[name], f"{where}{name}", problems, strict)
        elif item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING:
            problems.append(f"it lacks the key {where}{name}")
        elif strict and cls is RunRecord and name not in RunRecord.OMITTED_WHEN_NONE:
            problems.append(f"it lacks the key {where}{name}")
    unknown = sorted(set(data) - set(fields))
    if strict and unknown:
        problems.append(f"{where.rstrip('.') or 'it'} has keys this deltatune does not know: {', '.join(unknown)}")
    if len(problems) > already:
        return None
    try:
        return cls(**values)
    except (TypeError, ValueError, DeltatuneError) as error:
        problems.append(f"{where or 'it'} does not make a {cls.__name__} ({error})")
        return None


def _decode_value(annotation: Any, value: Any, where: str, problems: list[str], strict: bool) -> Any:
    """`value` read as `annotation`; what does not fit goes into `problems`."""
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in arguments:
            return None
        (inner,) = [argument for argument in arguments if argument is not type(None)]
        return _decode_value(inner, value, where, problems, strict)
    if annotation is TrainConfig:
        return _decode_train_config(value, where, problems)
    if annotation is TaskSpec:
        return _decode_task(value, where, problems)
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return _decode_dataclass(annotation, value, f"{where}.", problems, strict)
    kinds: dict[Any, type | tuple[type, ...]] = {
        dict: dict,
        list: list,
        str: str,
        int: int,
        float: (int, float),
        bool: bool,
    }
    expected = kinds.get(origin or annotation)
    if expected is None:
        return value
    if not isinstance(value, expected) or (isinstance(value, bool) and annotation in (int, float)):
        problems.append(f"{where} is {_kind(value)}, not {_type_name(annotation)}")
        return value
    return float(value) if annotation is float and isinstance(value, (int, float)) else value


def _decode_train_config(value: Any, where: str, problems: list[str]) -> TrainConfig | None:
    """The recorded training configuration; keys this deltatune no longer has (older records) are dropped."""
    if not isinstance(value, dict):
        problems.append(f"{where} is {_kind(value)}, not an object")
        return None
    known = {item.name for item in dataclasses.fields(TrainConfig)}
    try:
        return build_config(TrainConfig, {key: item for key, item in value.items() if key in known})
    except DeltatuneError as error:
        problems.append(f"{where} is not a valid training configuration ({' '.join(str(error).split())})")
        return None


def _decode_task(value: Any, where: str, problems: list[str]) -> TaskSpec | None:
    if not isinstance(value, dict):
        problems.append(f"its {where} is {_kind(value)}, not a task spec")
        return None
    try:
        return TaskSpec.from_dict(value)
    except (DeltatuneError, KeyError, TypeError, ValueError, AttributeError) as error:
        problems.append(f"its {where} is not a valid task spec ({type(error).__name__}: {str(error)[:120]})")
        return None


def _kind(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r:.40}"


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation) or annotation
    return {
        dict: "an object",
        list: "a list",
        str: "text",
        int: "a whole number",
        float: "a number",
        bool: "true or false",
    }.get(origin, str(annotation))


def read_run_record(directory: str | Path) -> RunRecord:
    """The run record of a run directory."""
    from deltatune.sources.records import RUN_RECORD

    return RunRecord.from_json(Path(directory) / RUN_RECORD)


__all__ = [
    "BaseModelRecord",
    "DeltaManifest",
    "DeviceRecord",
    "GitState",
    "LEGACY_MANIFEST_HEAD",
    "MANIFEST_VERSION",
    "ManifestHead",
    "ProcessesRecord",
    "RECORD_VERSION",
    "RunRecord",
    "Versions",
    "read_run_record",
]
