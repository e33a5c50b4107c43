"""One decoder, two heads: the language-model head it came with and FreeLM's teacher head.

The teacher head judges a proposition true or false from the decoder's final hidden state at the
proposition's last token: logits = W h_last, W ∈ R^{2×d} (d = 576 on SmolLM2-135M: 1,152
parameters). It is built as the `score` layer of the decoder's own `*ForSequenceClassification`
class, whose backbone is *the same module object* as the causal LM's. So:
  - the language signal (next-token loss through the LM head) and the teacher signal (through
    `score`) train one shared decoder, as in FreeLM;
  - whatever method adapts the decoder (LoRA by default) is applied once, to that classifier, and
    the result is an ordinary deltatune delta of a 2-label proposition classifier: `deltatune.load`
    rebuilds it from the base model's name like any other delta, and its backbone fingerprint is
    the one `load_model_for_task` computes.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from deltatune.errors import DeltatuneError
from deltatune.tasks.spec import TaskSpec

PROPOSITION_TASK = TaskSpec(
    "freelm-propositions",
    ("proposition",),
    ("false", "true"),
    metric="accuracy",
    metrics=("accuracy", "f1"),
    source="FreeLM proposition format (deltatune.tasks.propositions), built from the training tasks",
    description="is this proposition true? (FreeLM's teacher signal)",
)
"""The task a FreeLM delta is trained for: one text in, false/true out. Label 1 is 'true'."""

TRUE_INDEX = 1


class FreeLMModel(nn.Module):
    """A causal decoder with FreeLM's teacher head, sharing one backbone between both signals.

    `classifier` is the decoder's `*ForSequenceClassification` form (backbone + teacher head
    `score`); `lm_head` is the causal LM's output layer (tied to the input embeddings on
    SmolLM2). Both read the same backbone module, so one set of adapted weights serves both.
    """

    def __init__(self, classifier: PreTrainedModel, lm_head: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier
        self.lm_head = lm_head

    @property
    def backbone(self) -> nn.Module:
        return self.classifier.base_model

    def teacher_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(batch, 2) false/true logits at each proposition's last real token (right-padded batches)."""
        return self.classifier(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def language_loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy over the real tokens of `input_ids` (the language signal)."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        logits = self.lm_head(hidden[:, :-1]).float()
        targets = input_ids[:, 1:]
        if attention_mask is not None:
            targets = targets.masked_fill(attention_mask[:, 1:] == 0, -100)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


def build_classifier_sharing_backbone(
    causal_lm: PreTrainedModel, num_labels: int = 2, labels: tuple[str, ...] = PROPOSITION_TASK.labels
) -> PreTrainedModel:
    """The decoder's `*ForSequenceClassification` model with `causal_lm`'s backbone (not a copy).

    The classifier is built on the meta device (no 135M-parameter random initialisation), its
    backbone swapped for the causal LM's, and its head created for real with the model's own
    initialiser range.
    """
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(causal_lm.config)
    config.num_labels = num_labels
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: index for index, label in enumerate(labels)}
    config.problem_type = "single_label_classification"
    try:
        with torch.device("meta"):
            classifier = AutoModelForSequenceClassification.from_config(config)
    except ValueError as error:
        raise DeltatuneError(
            f"{type(causal_lm).__name__} has no sequence-classification form in transformers "
            f"({str(error).splitlines()[0]}); FreeLM needs one for its teacher head."
        ) from None
    prefix = classifier.base_model_prefix
    if not hasattr(causal_lm, prefix):
        raise DeltatuneError(
            f"{type(causal_lm).__name__} keeps its backbone under another name than "
            f"{type(classifier).__name__} ({prefix!r}); FreeLM cannot share it."
        )
    backbone = getattr(causal_lm, prefix)
    setattr(classifier, prefix, backbone)
    _materialise_head(classifier, config, next(backbone.parameters()).dtype)
    return classifier.train(causal_lm.training)


def _materialise_head(classifier: nn.Module, config, dtype: torch.dtype) -> None:
    """Create the classifier's head layers (still on the meta device) for real."""
    std = getattr(config, "initializer_range", 0.02)
    for name, module in list(classifier.named_modules()):
        has_meta = any(p.is_meta for p in module.parameters(recurse=False))
        if not has_meta:
            continue
        if not isinstance(module, nn.Linear):
            raise DeltatuneError(
                f"The head of {type(classifier).__name__} has a {type(module).__name__} "
                f"({name!r}); FreeLM only knows how to build linear heads."
            )
        real = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, dtype=dtype)
        nn.init.normal_(real.weight, std=std)
        if real.bias is not None:
            nn.init.zeros_(real.bias)
        parent_name, _, child_name = name.rpartition(".")
        setattr(classifier.get_submodule(parent_name) if parent_name else classifier, child_name, real)
    leftover = [n for n, p in classifier.named_parameters() if p.is_meta]
    if leftover:
        raise DeltatuneError(f"{type(classifier).__name__} has parameters FreeLM could not build: {leftover[:5]}")


class StandardizedHead(nn.Module):
    """The teacher head during training: logits = V (D P h), V trained, D P fixed (see `standardize_head`).

    P = I − u uᵀ removes the direction u of the mean last-token state and D = diag(1/σ) scales what is
    left to unit spread, so V sees centred, standardised features. Folded back into one plain linear
    layer, W = V D P, when training ends (`fold_head`): the saved head is an ordinary `score` layer.
    """

    transform: torch.Tensor

    def __init__(self, transform: torch.Tensor, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(out_features, transform.shape[0]))
        self.register_buffer("transform", transform)

    def folded_weight(self) -> torch.Tensor:
        return self.weight @ self.transform

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.folded_weight().to(hidden.dtype))


def head_transform(states: torch.Tensor, minimum_spread: float = 1e-3) -> torch.Tensor:
    """D P for last-token states (n, d): P projects out the mean state's direction (after it the mean is
    exactly 0), D divides each dimension by its spread; returned as one (d, d) matrix."""
    states = states.double()
    mean = states.mean(0)
    direction = mean / mean.norm().clamp(min=1e-12)
    projection = torch.eye(states.shape[1], dtype=states.dtype) - torch.outer(direction, direction)
    spread = (states @ projection).std(0)
    spread = spread.clamp(min=minimum_spread * float(spread.mean()))
    return (torch.diag(1 / spread) @ projection).float()


def standardize_head(model: FreeLMModel, states: torch.Tensor) -> None:
    """Swap the classifier's linear head for a `StandardizedHead` fitted to `states` (it starts at zero:
    every proposition begins at log-odds 0)."""
    name, head = _linear_head(model.classifier)
    replacement = StandardizedHead(head_transform(states), head.out_features).to(head.weight.dtype)
    replacement.weight.requires_grad_(head.weight.requires_grad)
    _set_module(model.classifier, name, replacement)


def fold_head(model: FreeLMModel) -> None:
    """Put a plain linear head with the equivalent weight W = V D P back (no-op without a standardized one)."""
    for name, module in model.classifier.named_modules():
        if isinstance(module, StandardizedHead):
            linear = nn.Linear(module.weight.shape[1], module.weight.shape[0], bias=False, dtype=module.weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(module.folded_weight())
            linear.weight.requires_grad_(module.weight.requires_grad)
            _set_module(model.classifier, name, linear)


def _linear_head(classifier: nn.Module) -> tuple[str, nn.Linear]:
    from deltatune.methods.common import head_names

    names = head_names(classifier)
    for name, module in classifier.named_modules():
        if isinstance(module, nn.Linear) and f"{name}.weight" in names and module.bias is None:
            return name, module
    raise DeltatuneError(
        f"{type(classifier).__name__}'s teacher head is not one bias-free linear layer "
        f"({sorted(names)}); run with --no-standardize-head."
    )


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child_name, module)


def build_freelm_model(causal_lm: PreTrainedModel) -> FreeLMModel:
    """FreeLM's model around a loaded causal LM (its backbone and LM head are shared, not copied)."""
    lm_head = causal_lm.get_output_embeddings()
    if lm_head is None:
        raise DeltatuneError(
            f"{type(causal_lm).__name__} has no language-model head; FreeLM needs a causal LM "
            "(load it with deltatune.sources.models.load_causal_lm)."
        )
    return FreeLMModel(build_classifier_sharing_backbone(causal_lm), lm_head)


__all__ = [
    "FreeLMModel",
    "PROPOSITION_TASK",
    "StandardizedHead",
    "TRUE_INDEX",
    "build_classifier_sharing_backbone",
    "build_freelm_model",
    "fold_head",
    "head_transform",
    "standardize_head",
]
