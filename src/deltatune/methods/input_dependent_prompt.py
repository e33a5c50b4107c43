"""Input-dependent prompt tuning (Levine et al. 2022, "Standing on the Shoulders of Giant Frozen
Language Models", arXiv:2204.10019): a small trainable network writes a different soft prompt
for every input, in front of the frozen model.

Plain prompt tuning (Lester et al. 2021) gives every input the same L vectors P ∈ R^{L×d}; with many
tasks behind one frozen model, one fixed prompt has to serve them all. ID-PT makes the prompt a
function of the input: a frozen encoder reads x, and a learned cross-attention from prompt queries
to the encoder's states turns that reading into the prompt:

    H = Enc(x) ∈ R^{n×e}                         frozen (the paper: a T5-base encoder)
    Q = P W_q,  K = H W_k,  V = H W_v            W_q ∈ R^{d×a}, W_k, W_v ∈ R^{e×a}, split into heads
    p(x) = P + softmax(Q K^T / √(a/heads)) V W_o     W_o ∈ R^{a×d}, starts at zero
    h_0 = [p(x); E(x)]                           the frozen decoder reads the prompt, then the input

W_o starts at zero, so training starts exactly from plain prompt tuning with the same initial P
(`init`, `init_text` as in `prompt-tuning`) and learns how much each input should move its prompt.
Where the prompt sits, the attention mask, positions and the Llama head's pooling all work as in
`prompt-tuning` (see that module): the backbone's output drops the L prompt positions again.

The encoder Enc:
  - `embeddings` (default): the frozen decoder's own input embeddings of x, no extra model (e = d).
    Attention over them is a learned, input-weighted pooling of the input's words.
  - any model name (`minilm-l6`, a local directory, a hub id): a separate frozen encoder with its own
    tokenizer, run on the input's text (decoded from the decoder's tokens); its weights are loaded
    from that source whenever the method is applied and are never part of the delta.

Parameter cost: L·d + d·a + 2·e·a + a·d (+ the task head). With the defaults (L=20, a=128):
  SmolLM2-135M (d=576), encoder=embeddings (e=576): 11,520 + 73,728 + 147,456 + 73,728 = 306,432 (0.23%);
  SmolLM2-135M with encoder=minilm-l6 (e=384): 257,280 (0.19%), plus MiniLM's 22.7M frozen parameters
  held in memory (not saved);
  MiniLM-L6 (d=e=384), encoder=embeddings: 7,680 + 49,152 + 98,304 + 49,152 = 204,288 (0.89%).
The delta holds exactly these (and the head); for comparison, plain prompt tuning is L·d (11,520).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from deltatune.errors import DeltatuneError
from deltatune.methods.base import Method, OptimizerSettings, layer_depths
from deltatune.methods.common import head_names, text_config
from deltatune.methods.prompt_tuning import PromptTuningConfig, initial_prompt, install_prompt_site
from deltatune.methods.prompts import (
    arguments_as_keywords,
    backbone_of,
    batch_size_and_length,
    check_position_budget,
    drop_leading_positions,
    find_tokenizer,
    prepend_soft_tokens,
    reject_non_empty_cache,
    word_embeddings,
)
from deltatune.methods.registry import register
from deltatune.methods.state import DEFAULT_DELTA, DeltaSite, site_at

METHOD_NAME = "input-dependent-prompt"
EMBEDDINGS = "embeddings"


@dataclass(frozen=True)
class InputDependentPromptConfig:
    num_virtual_tokens: int = 20
    """Length L of the generated prompt."""
    encoder: str = EMBEDDINGS
    """What reads the input for the prompt generator: 'embeddings' (the frozen decoder's own input
    embeddings, no extra model) or a model name, local directory or hub id of a frozen encoder
    (e.g. 'minilm-l6'), run on the input's text."""
    attention_size: int = 128
    """Width a of the generator's cross-attention (queries, keys and values)."""
    num_heads: int = 4
    """Attention heads of the generator; must divide attention_size."""
    init: Literal["text", "vocab", "random"] = "text"
    """How the static part P of the prompt starts, as in prompt-tuning: 'text' (embeddings of init_text,
    needs the decoder's tokenizer), 'vocab' (random vocabulary embeddings) or 'random'."""
    init_text: str = "classify the sentiment or meaning of this text"
    """Text whose token embeddings start P with init=text (prompt-tuning's default)."""
    generator_learning_rate_ratio: float = 0.1
    """The generator's projections train at this times the learning rate; P and the head at the full rate
    (prompt tuning's large rate, 3e-2, suits P but would throw the projections about)."""
    encoder_max_length: int = 128
    """Tokens the external encoder reads per input (ignored for encoder=embeddings)."""

    def __post_init__(self) -> None:
        problems = []
        if self.num_virtual_tokens < 1:
            problems.append(f"method.num_virtual_tokens={self.num_virtual_tokens} must be at least 1 (e.g. 20)")
        if self.attention_size < 1 or self.num_heads < 1:
            problems.append(
                f"method.attention_size={self.attention_size} and method.num_heads={self.num_heads} must be at least 1"
            )
        elif self.attention_size % self.num_heads:
            problems.append(
                f"method.attention_size={self.attention_size} must be a multiple of "
                f"method.num_heads={self.num_heads} (e.g. 128 and 4)"
            )
        if self.init not in ("text", "vocab", "random"):
            problems.append(f"method.init={self.init!r} must be one of 'text', 'vocab', 'random'")
        if self.init == "text" and not self.init_text.strip():
            problems.append("method.init=text needs a non-empty method.init_text")
        if not self.encoder.strip():
            problems.append("method.encoder must be 'embeddings' or a model name such as 'minilm-l6'")
        if not self.generator_learning_rate_ratio > 0:
            problems.append(
                f"method.generator_learning_rate_ratio={self.generator_learning_rate_ratio} must be positive (e.g. 0.1)"
            )
        if self.encoder_max_length < 2:
            problems.append(f"method.encoder_max_length={self.encoder_max_length} must be at least 2")
        if problems:
            raise DeltatuneError("; ".join(problems))


class ExternalEncoder(nn.Module):
    """A frozen encoder with its own tokenizer, fed the text the decoder's tokens spell."""

    def __init__(self, model: nn.Module, tokenizer, max_length: int) -> None:
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)

    @property
    def width(self) -> int:
        return text_config(self.model).hidden_size

    def train(self, mode: bool = True) -> ExternalEncoder:
        super().train(mode)
        self.model.eval()  # frozen means no dropout either: the same input always gets the same states
        return self

    @torch.no_grad()
    def forward(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.model.parameters()).device
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        batch = {key: value.to(device) for key, value in batch.items()}
        return self.model(**batch).last_hidden_state, batch["attention_mask"]


class PromptGenerator(nn.Module):
    """p(x) = P + MultiHeadAttention(P W_q, H W_k, H W_v) W_o, one prompt of L vectors per input."""

    def __init__(
        self,
        initial_prompt: torch.Tensor,
        encoder_width: int,
        attention_size: int,
        num_heads: int,
        encoder: ExternalEncoder | None = None,
    ) -> None:
        super().__init__()
        width = initial_prompt.shape[1]
        dtype = initial_prompt.dtype
        self.prompt = nn.Parameter(initial_prompt.detach().clone())
        self.query = nn.Linear(width, attention_size, bias=False, dtype=dtype)
        self.key = nn.Linear(encoder_width, attention_size, bias=False, dtype=dtype)
        self.value = nn.Linear(encoder_width, attention_size, bias=False, dtype=dtype)
        self.output = nn.Linear(attention_size, width, bias=False, dtype=dtype)
        nn.init.zeros_(self.output.weight)  # start as plain prompt tuning: p(x) = P for every x
        self.num_heads = num_heads
        self.encoder = encoder
        self.decoder_tokenizer = None
        """The decoder's tokenizer, to turn input_ids back into text for an external encoder."""

    @property
    def num_tokens(self) -> int:
        return self.prompt.shape[0]

    def generator_parameters(self) -> list[torch.Tensor]:
        return [self.query.weight, self.key.weight, self.value.weight, self.output.weight]

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """states (batch, n, e) and mask (batch, n) -> prompts (batch, L, d)."""
        batch_size = states.shape[0]
        heads, size = self.num_heads, self.query.out_features // self.num_heads
        states = states.to(self.key.weight.dtype)
        queries = self.query(self.prompt).view(1, -1, heads, size).transpose(1, 2)  # (1, h, L, s)
        keys = self.key(states).view(batch_size, -1, heads, size).transpose(1, 2)  # (b, h, n, s)
        values = self.value(states).view(batch_size, -1, heads, size).transpose(1, 2)  # (b, h, n, s)
        scores = queries @ keys.transpose(-1, -2) / math.sqrt(size)  # (b, h, L, n)
        scores = scores.masked_fill(mask[:, None, None, :] == 0, torch.finfo(scores.dtype).min)
        mixed = (F.softmax(scores, dim=-1) @ values).transpose(1, 2).reshape(batch_size, self.num_tokens, -1)
        return self.prompt.unsqueeze(0) + self.output(mixed)


def _encoder_states(
    generator: PromptGenerator, backbone: nn.Module, kwargs: dict, inputs_embeds: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    batch_size, length = inputs_embeds.shape[:2]
    mask = kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones(batch_size, length, dtype=torch.long, device=inputs_embeds.device)
    if generator.encoder is None:
        return inputs_embeds, mask
    input_ids = kwargs.get("input_ids")
    if input_ids is None:
        raise DeltatuneError(
            f"{METHOD_NAME} with an external encoder reads the input's text, so the model must "
            "be called with input_ids (not inputs_embeds)."
        )
    if generator.decoder_tokenizer is None:
        raise DeltatuneError(
            f"{METHOD_NAME} with an external encoder needs the decoder's tokenizer to recover the "
            "input's text; set the method's `tokenizer` attribute before applying it."
        )
    texts = [
        generator.decoder_tokenizer.decode(row[row_mask.bool()].tolist(), skip_special_tokens=True)
        for row, row_mask in zip(input_ids, mask, strict=True)
    ]
    return generator.encoder(texts)


class GeneratorSite(DeltaSite[PromptGenerator]):
    """Each delta's prompt generator (registered as `<backbone>.input_dependent_prompt`); the active one runs."""


def _prepend_generated_prompt(backbone: PreTrainedModel, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook on the backbone: input_ids -> inputs_embeds with p(x) in front."""
    generator = site_at(backbone, "input_dependent_prompt", GeneratorSite).active_part()
    if generator is None:
        return None
    kwargs = arguments_as_keywords(backbone, args, kwargs)
    reject_non_empty_cache(kwargs, METHOD_NAME)
    num_tokens = generator.num_tokens
    _, length, device = batch_size_and_length(kwargs)
    check_position_budget(backbone, num_tokens, length, METHOD_NAME)

    inputs_embeds = kwargs.get("inputs_embeds")
    if inputs_embeds is None:
        inputs_embeds = backbone.get_input_embeddings()(kwargs["input_ids"])
    states, state_mask = _encoder_states(generator, backbone, kwargs, inputs_embeds)
    prompts = generator(states, state_mask.to(states.device)).to(inputs_embeds.dtype)
    return (), prepend_soft_tokens(kwargs, prompts, inputs_embeds, length, device)


def _drop_prompt_positions(backbone: nn.Module, args: tuple, output: Any) -> Any:
    """Forward hook: the last hidden state lines up with input_ids again (for Llama's last-token pooling)."""
    generator = site_at(backbone, "input_dependent_prompt", GeneratorSite).active_part()
    return output if generator is None else drop_leading_positions(output, generator.num_tokens)


def load_external_encoder(name: str, max_length: int) -> ExternalEncoder:
    """The frozen encoder `name` (alias, local directory or hub id) and its tokenizer."""
    from pathlib import Path

    from transformers import AutoModel

    from deltatune.sources.models import load_tokenizer, resolve_model

    location = resolve_model(name)
    try:
        model = AutoModel.from_pretrained(location, use_safetensors=True, local_files_only=Path(location).is_dir())
    except (OSError, ValueError) as error:
        raise DeltatuneError(
            f"method.encoder={name!r} could not be loaded as a frozen encoder "
            f"({str(error).splitlines()[0]}). Use 'embeddings', a model alias such as "
            "'minilm-l6', or a local model directory."
        ) from None
    if not hasattr(model.config, "hidden_size"):
        raise DeltatuneError(
            f"method.encoder={name!r} has no hidden_size in its config; use an encoder such as 'minilm-l6'."
        )
    return ExternalEncoder(model, load_tokenizer(name), max_length)


@register(METHOD_NAME, InputDependentPromptConfig)
class InputDependentPrompt(Method):
    """Input-dependent prompt tuning: a frozen encoder + learned cross-attention write each input's soft prompt."""

    # P needs prompt tuning's large step (see prompt-tuning); the projections get a tenth of it
    # through param_groups (method.generator_learning_rate_ratio)
    default_learning_rate = 3e-2
    # `lr_search: auto`: as prompt tuning
    learning_rate_candidates = (3e-3, 1e-2, 3e-2, 1e-1)

    def apply(self, model: nn.Module, name: str = DEFAULT_DELTA) -> None:
        backbone = backbone_of(model)
        table = word_embeddings(backbone).weight
        needs_tokenizer = self.config.init == "text" or self.config.encoder != EMBEDDINGS
        if needs_tokenizer and self.tokenizer is None:
            self.tokenizer = find_tokenizer(
                model,
                f"{METHOD_NAME} needs the decoder's tokenizer (for method.init=text and for an external "
                "method.encoder)",
                "Use method.init=vocab with method.encoder=embeddings, or set the method's `tokenizer` attribute "
                "before applying it.",
            )
        # the static part starts exactly as plain prompt tuning's prompt would
        with torch.no_grad():
            initial = initial_prompt(
                PromptTuningConfig(self.config.num_virtual_tokens, self.config.init, self.config.init_text),
                self.tokenizer,
                model,
                table,
            ).to(table.dtype)
        encoder = None
        if self.config.encoder != EMBEDDINGS:
            encoder = load_external_encoder(self.config.encoder, self.config.encoder_max_length)
            encoder.to(table.device)
        generator = PromptGenerator(
            initial,
            encoder.width if encoder is not None else table.shape[1],
            self.config.attention_size,
            self.config.num_heads,
            encoder,
        )
        generator.decoder_tokenizer = self.tokenizer
        super().apply(model, name)
        site = install_prompt_site(
            backbone, "input_dependent_prompt", GeneratorSite, _prepend_generated_prompt, _drop_prompt_positions
        )
        site.add_part(model, name, generator.to(table.device), self.name)

    def _generator(self, model: nn.Module) -> PromptGenerator:
        return site_at(backbone_of(model), "input_dependent_prompt", GeneratorSite).part_of(self._applied_name())

    def trainable_names(self, model: nn.Module) -> set[str]:
        generator = self._generator(model)
        own = {id(generator.prompt)} | {id(p) for p in generator.generator_parameters()}
        return {n for n, p in model.named_parameters() if id(p) in own} | head_names(model)

    def param_groups(self, model: nn.Module, learning_rate: float, settings: OptimizerSettings) -> list[dict]:
        """P and the head at the full rate, the projections at generator_learning_rate_ratio of it; weight
        decay on the projections and head matrices only; each times layer_lr_decay^depth when set."""
        generator = self._generator(model)
        head = [p for n, p in model.named_parameters() if n in head_names(model) and p.requires_grad]
        ratio = self.config.generator_learning_rate_ratio
        roles: list[tuple[list[torch.Tensor], float, bool]] = [
            ([generator.prompt], 1.0, False),
            (generator.generator_parameters(), ratio, True),
            ([p for p in head if p.ndim >= 2], 1.0, True),
            ([p for p in head if p.ndim < 2], 1.0, False),
        ]
        depths = layer_depths(model, settings)
        depth_of = {id(p): depths.get(n, 0) for n, p in model.named_parameters()}
        decay = settings.layer_lr_decay or 1.0
        groups = []
        for parameters, scale, decays in roles:
            by_depth: dict[int, list] = {}
            for parameter in parameters:
                if parameter.requires_grad:
                    by_depth.setdefault(depth_of[id(parameter)], []).append(parameter)
            groups += [
                {
                    "params": params,
                    "lr": learning_rate * scale * decay**depth,
                    "weight_decay": settings.weight_decay if decays else 0.0,
                }
                for depth, params in sorted(by_depth.items())
            ]
        return groups
