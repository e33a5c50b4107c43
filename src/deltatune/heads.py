"""Task heads: how a pretrained model's hidden states become a class or a score.

Two kinds of head, each reading one pooled vector per text:

    cross-encoder   the text, or both texts of a pair, go through the model as one sequence; a linear layer
                    reads the pooled vector. What transformers' `*ForSequenceClassification` classes do.
    bi-encoder      sentence pairs only: each text goes through the model alone and is pooled to u and v.
                    A regression task predicts cos(u, v) mapped linearly onto the task's score range (the
                    cosine-similarity objective of SBERT, Reimers & Gurevych 2019, arXiv:1908.10084); a
                    classification task puts a linear layer over [u, v, |u - v|] (SBERT's classifier). With
                    regression its untrained output is the zero-shot embedding-similarity baseline exactly.

Pooling, the vector read from a sequence of hidden states h_1..h_n with real (unpadded) tokens 1..m:

    cls    h_1, the first position ([CLS] in BERT). The cross-encoder of a model with a pretrained pooler
           (BERT's tanh layer over [CLS]) reads it through that pooler, as transformers' own head does.
    mean   (1/m) sum_{i<=m} h_i: what sentence-embedding models are trained to produce.
    last   h_m: the last real token, the only one a decoder has read everything up to.

Defaults (`--head auto --pooling auto`), by model family, recorded in the run record and the delta:
    pooling   the checkpoint's own sentence-embedding pooling where it declares one (a sentence-transformers
              `1_Pooling/config.json`, as all-MiniLM-L6-v2 has: mean); otherwise cls for encoders (the BERT
              family) and last for decoders (the Llama family)
    head      a bi-encoder for sentence-pair regression (similarity) on a sentence-embedding model, which
              it was trained to be; a cross-encoder everywhere else

The cross-encoder with its family's native pooling (cls on BERT, last on Llama) is transformers' own
`AutoModelForSequenceClassification`, unchanged; every other combination is `PooledTaskModel` below, a
backbone plus a small head, with the backbone registered under the same attribute name (`bert`, `model`)
so parameter names, and with them every method's targeting, stay the same.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import PreTrainedModel

from deltatune.errors import DeltatuneError
from deltatune.tasks.spec import TaskSpec

if TYPE_CHECKING:
    from deltatune.records import DeltaManifest

HEAD_KINDS = ("cross-encoder", "bi-encoder")
POOLINGS = ("cls", "mean", "last")
LEGACY_HEAD = {"kind": "cross-encoder", "pooling": "native"}
"""The head of a delta saved before heads were configurable: transformers' own classification head."""


@dataclass(frozen=True)
class HeadConfig:
    """A resolved head: its kind, its pooling, and why those (for the record)."""

    kind: str
    """'cross-encoder' or 'bi-encoder'."""
    pooling: str
    """'cls', 'mean' or 'last'."""
    reason: str = ""
    """Where the choice came from: the user, the checkpoint's pooling config, or the model family's default."""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def is_encoder(model_config: Any) -> bool:
    """Encoders (the BERT family) are masked language models; decoders (the Llama family) are not."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return getattr(model_config, "model_type", None) in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def native_pooling(model_config: Any) -> str:
    """What transformers' own classification head reads: [CLS] in encoders, the last token in decoders."""
    return "cls" if is_encoder(model_config) else "last"


def declared_pooling(model_directory: str | Path | None) -> str | None:
    """The pooling a sentence-embedding checkpoint declares (sentence-transformers' Pooling module), if any."""
    if model_directory is None:
        return None
    path = Path(model_directory) / "1_Pooling" / "config.json"
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for key, pooling in (
        ("pooling_mode_mean_tokens", "mean"),
        ("pooling_mode_cls_token", "cls"),
        ("pooling_mode_lasttoken", "last"),
    ):
        if settings.get(key):
            return pooling
    return None


def resolve_head(
    kind: str, pooling: str, task: TaskSpec, model_config: Any, model_directory: str | Path | None = None
) -> HeadConfig:
    """The head for `task` on this model: the user's choice where given ('auto' otherwise), checked."""
    problems = []
    if kind not in ("auto", *HEAD_KINDS):
        problems.append(f"head={kind!r} must be one of auto, {', '.join(HEAD_KINDS)}")
    if pooling not in ("auto", "native", *POOLINGS):
        problems.append(f"pooling={pooling!r} must be one of auto, {', '.join(POOLINGS)}")
    if kind == "bi-encoder" and len(task.text_fields) != 2:
        problems.append(
            f"head=bi-encoder encodes the two texts of a pair separately, but task {task.name!r} has "
            f"{len(task.text_fields)} text field ({', '.join(task.text_fields)}); use "
            "head=cross-encoder"
        )
    if problems:
        raise DeltatuneError("; ".join(problems))
    sentence_pooling = declared_pooling(model_directory)
    reasons = []
    if pooling == "native":  # a delta saved before heads were configurable
        pooling = native_pooling(model_config)
        reasons.append(f"pooling {pooling}: transformers' own head")
    elif pooling == "auto":
        if sentence_pooling is not None:
            pooling = sentence_pooling
            reasons.append(f"pooling {pooling}: the checkpoint's sentence-embedding pooling")
        else:
            pooling = native_pooling(model_config)
            reasons.append(f"pooling {pooling}: the default for {'encoders' if pooling == 'cls' else 'decoders'}")
    else:
        reasons.append(f"pooling {pooling}: chosen")
    if kind == "auto":
        similarity = len(task.text_fields) == 2 and task.is_regression
        kind = "bi-encoder" if similarity and sentence_pooling is not None else "cross-encoder"
        reasons.append(
            f"{kind}: the default for "
            + (
                "sentence-pair regression on a sentence-embedding model"
                if kind == "bi-encoder"
                else "this task and model"
            )
        )
    else:
        reasons.append(f"{kind}: chosen")
    return HeadConfig(kind, pooling, "; ".join(reasons))


def uses_native_head(head: HeadConfig, model_config: Any) -> bool:
    """True when transformers' own `*ForSequenceClassification` is exactly this head."""
    return head.kind == "cross-encoder" and head.pooling == native_pooling(model_config)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """One vector per row of right-padded hidden states (batch, length, width), in fp32."""
    hidden = hidden.float()
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last":
        last = attention_mask.sum(dim=1).clamp(min=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def _classifier_output(logits: torch.Tensor):
    from transformers.modeling_outputs import SequenceClassifierOutput

    return SequenceClassifierOutput(logits=logits)


class PooledTaskModel(nn.Module):
    """A pretrained backbone and a head that reads pooled vectors: see the module docstring.

    The backbone sits under its usual attribute (`bert`, `model`, ...), so `model.base_model` is the
    backbone and everything outside it is the head, as for transformers' task models. A bi-encoder's
    forward takes both texts of each pair stacked along the batch: rows 0..n-1 the first texts, rows
    n..2n-1 the second (what `deltatune.batching.collate` builds for it).
    """

    def __init__(self, backbone: PreTrainedModel, task: TaskSpec, head: HeadConfig) -> None:
        super().__init__()
        self.base_model_prefix = getattr(backbone, "base_model_prefix", "") or "backbone"
        setattr(self, self.base_model_prefix, backbone)
        self.config = backbone.config
        self.name_or_path = getattr(backbone, "name_or_path", "")
        self.head_config = head
        self.regression = task.is_regression
        hidden_size = self.config.get_text_config().hidden_size
        classifier_dropout = getattr(self.config, "classifier_dropout", None)
        dropout = (
            classifier_dropout if classifier_dropout is not None else getattr(self.config, "hidden_dropout_prob", 0.0)
        )
        self.dropout = nn.Dropout(dropout)
        # a bi-encoder's similarity score has no weights; everything else ends in one linear layer
        if not (head.kind == "bi-encoder" and task.is_regression):
            width = 3 * hidden_size if head.kind == "bi-encoder" else hidden_size
            self.classifier = nn.Linear(width, task.num_labels)
            nn.init.normal_(self.classifier.weight, std=getattr(self.config, "initializer_range", 0.02))
            nn.init.zeros_(self.classifier.bias)

    @property
    def base_model(self) -> PreTrainedModel:
        backbone = getattr(self, self.base_model_prefix)
        assert isinstance(backbone, PreTrainedModel)  # `__init__` takes nothing else
        return backbone

    @property
    def encodes_texts_separately(self) -> bool:
        return self.head_config.kind == "bi-encoder"

    def set_attn_implementation(self, implementation: str) -> None:
        self.base_model.set_attn_implementation(implementation)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ):
        if attention_mask is None:
            reference = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
            if reference is None:
                raise DeltatuneError(f"{type(self).__name__} needs input_ids or inputs_embeds; it got neither.")
            attention_mask = torch.ones(reference.shape[:2], dtype=torch.long, device=reference.device)
        arguments = {"input_ids": input_ids, "attention_mask": attention_mask, **kwargs}
        if token_type_ids is not None:
            arguments["token_type_ids"] = token_type_ids
        hidden = self.base_model(**arguments).last_hidden_state
        pooled = pool(hidden, attention_mask, self.head_config.pooling)
        if self.head_config.kind == "cross-encoder":
            return _classifier_output(self.classifier(self.dropout(pooled)))
        first, second = pooled.chunk(2)
        if self.regression:
            return _classifier_output(nn.functional.cosine_similarity(first, second, dim=-1).unsqueeze(-1))
        features = torch.cat([first, second, (first - second).abs()], dim=-1)
        return _classifier_output(self.classifier(self.dropout(features)))


def build_task_model(backbone: PreTrainedModel, task: TaskSpec, head: HeadConfig) -> PooledTaskModel:
    """A `PooledTaskModel`; a pooler the head does not read is dropped, so nothing trains that the output
    does not depend on."""
    if head.pooling != "cls" or head.kind == "bi-encoder":
        if getattr(backbone, "pooler", None) is not None:
            backbone.register_module("pooler", None)  # a registered submodule may be replaced by None
    return PooledTaskModel(backbone, task, head)


def encodes_texts_separately(model: nn.Module) -> bool:
    """Whether `model` takes each text of a pair as its own sequence (a bi-encoder)."""
    return bool(getattr(model, "encodes_texts_separately", False))


def target_scale(model: nn.Module, task: TaskSpec, labels) -> tuple[float, float] | None:
    """(offset, scale) mapping the model's raw regression output to task units: y = offset + scale * raw.

    Regression heads learn standardised targets (mean, std of the training labels): a fresh linear head
    outputs about 0, and with a small learning rate it would spend the budget walking its bias to a mean
    like STS-B's 2.7. A bi-encoder's raw output is a cosine, mapped onto the score range (low, high - low).
    Classification: None.
    """
    from deltatune.batching import regression_scale

    if not task.is_regression:
        return None
    if encodes_texts_separately(model):
        assert task.score_range is not None  # TaskSpec demands a score_range when it has no labels
        low, high = task.score_range
        return float(low), float(high - low)
    return regression_scale(labels)


def head_of(model: nn.Module) -> HeadConfig:
    """The head a task model carries (`load_model_for_task` sets `head_config`; transformers' own head else)."""
    head = getattr(model, "head_config", None)
    return head if isinstance(head, HeadConfig) else HeadConfig("cross-encoder", native_pooling(model.config))


def foreign_head(manifest: DeltaManifest, directory, what: str) -> str | None:
    """Why the delta of `manifest` cannot go where only transformers' own task heads go (`what`), or None.

    A delta trained with deltatune's pooled cross-encoder or bi-encoder head wraps the backbone in
    `PooledTaskModel`, which a plain transformers model (an export), a shared base of native heads
    (`load_many`) or a merge of weights does not have: its outputs would come out different."""
    head = manifest.head
    if head is None or head.transformers_head:
        return None
    return (
        f"{directory} was trained with a {head.kind} head pooling by {head.pooling}, which "
        f"{what} does not support (only transformers' own task head). Use it with deltatune.load, or "
        "retrain with the model's native head (--head cross-encoder --pooling cls for BERT-family models, "
        "last for decoders)."
    )


def shared_head(
    run_dirs: Sequence[str | Path],
    manifests: list[DeltaManifest],
    what: str = "load_many",
    allow_bi_encoder: bool = False,
) -> dict:
    """The one head every delta was trained with (kind and pooling): the shared forward pass reads it.

    Deltas trained with different heads (a [CLS] classifier beside a mean-pooled one) would need
    different forward passes of the base, so they are refused, naming the runs; so are bi-encoders,
    whose batches hold two rows per input, unless `allow_bi_encoder` (a merge, which runs no batch)."""
    heads: dict[tuple[str, str], list[str]] = {}
    for directory, manifest in zip(run_dirs, manifests, strict=True):
        head = manifest.head
        # the model family's own head, however it was recorded
        kind, pooling = (
            (LEGACY_HEAD["kind"], LEGACY_HEAD["pooling"])
            if head is None or head.transformers_head
            else (head.kind, head.pooling)
        )
        heads.setdefault((kind, pooling), []).append(str(directory))
    if len(heads) > 1:
        listing = "; ".join(
            f"{kind} pooling by {pooling}: {', '.join(dirs)}" for (kind, pooling), dirs in heads.items()
        )
        raise DeltatuneError(
            f"These deltas were trained with {len(heads)} different heads ({listing}); {what} takes "
            "deltas of one head. Give each group on its own, or train them with one --head and "
            "--pooling."
        )
    (kind, pooling), dirs = next(iter(heads.items()))
    if kind == "bi-encoder" and not allow_bi_encoder:
        raise DeltatuneError(
            f"{dirs[0]} was trained with a bi-encoder head (each text of a pair encoded alone), which "
            f"{what} does not serve yet. Use deltatune.load for it, or train with --head "
            "cross-encoder."
        )
    return {"kind": kind, "pooling": pooling}


PAIR_HEAD = ("classifier.weight", "classifier.bias")
"""The tensors of a bi-encoder classifier's head (`PooledTaskModel.classifier` over [u, v, |u-v|])."""


def serving_head(run_dirs: Sequence[str | Path], manifests: list[DeltaManifest]) -> dict:
    """The head `load_many` builds the shared base with, for deltas that may mix cross- and bi-encoders.

    The cross-encoder deltas share one head (`shared_head`). Bi-encoder deltas run on the same forward passes,
    each text of a pair as its own row, so they join them when they pool the same way and the cross-encoders
    use deltatune's pooled head (transformers' own [CLS] head reads a pooler a bi-encoder's base does not
    have): a score task's two pooled texts give their cosine, a classifier's own linear layer reads
    [u, v, |u-v|] of them (`PAIR_HEAD`), kept beside the base's head."""
    pairs = list(zip(run_dirs, manifests, strict=True))
    apart = [(d, m) for d, m in pairs if m.head is not None and m.head.kind == "bi-encoder"]
    together = [(d, m) for d, m in pairs if m.head is None or m.head.kind != "bi-encoder"]
    poolings = sorted({manifest.head.pooling for _, manifest in apart if manifest.head is not None})
    if len(poolings) > 1:
        shared_head([d for d, _ in apart], [m for _, m in apart], allow_bi_encoder=True)  # names the groups
    if not together:
        return {"kind": "bi-encoder", "pooling": poolings[0]}
    head = shared_head([d for d, _ in together], [m for _, m in together])
    if apart and head["pooling"] != poolings[0]:
        raise DeltatuneError(
            f"{apart[0][0]} (a bi-encoder pooling by {poolings[0]}) and {together[0][0]} (a cross-encoder "
            f"pooling by {head['pooling']}) need different forward passes of the base. Serve bi-encoders "
            f"beside cross-encoders that pool the same way (--head cross-encoder --pooling {poolings[0]}), "
            "or in a process of their own."
        )
    return head


__all__ = [
    "serving_head",
    "PAIR_HEAD",
    "shared_head",
    "foreign_head",
    "HEAD_KINDS",
    "POOLINGS",
    "HeadConfig",
    "PooledTaskModel",
    "build_task_model",
    "declared_pooling",
    "encodes_texts_separately",
    "head_of",
    "native_pooling",
    "pool",
    "resolve_head",
    "target_scale",
]
