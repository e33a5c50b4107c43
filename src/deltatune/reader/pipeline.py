"""The frozen reader end to end: retrieve, re-rank, read, answer; train its small parts; score it.

`FrozenReader` holds the frozen decoder, its tokenizer, the trained parts (soft prompt, re-ranker) and
the configuration. `train_reader` trains the re-ranker and then the prompt (the decoder stays frozen:
every parameter of it has requires_grad False and its weights digest is checked after training);
`answer_questions` produces answers for a list of questions with a chosen number of passages.
"""

from __future__ import annotations

import random
import sys
import time
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from deltatune.batching import autocast_for
from deltatune.errors import DeltatuneError
from deltatune.interrupts import raise_if_requested
from deltatune.methods.prompts import word_embeddings
from deltatune.precision import frozen_linear_weights_in_bf16, resolve_precision
from deltatune.reader.config import ReaderConfig
from deltatune.reader.data import QADataset, QAExample, contains_answer, exact_match, token_f1
from deltatune.reader.model import (
    PASSAGE_PREFIX,
    Reranker,
    SoftPrompt,
    answer_loss,
    frozen_weights_digest,
    generate_answers,
    mean_embeddings,
    reranker_loss,
)
from deltatune.reader.retrieval import BM25Index

DEFAULT_QUESTION_TEMPLATE = "Question: {question}\nAnswer:"
CLOZE_QUESTION_TEMPLATE = "Fill in the blank (_____) with a name or a number.\n{question}\nAnswer:"


@dataclass
class FrozenReader:
    causal_lm: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    config: ReaderConfig
    question_template: str = DEFAULT_QUESTION_TEMPLATE
    prompt: SoftPrompt | None = None
    reranker: Reranker | None = None
    _passage_cache: dict[int, list[int]] = field(default_factory=dict, repr=False)
    _stop_tokens: set[int] | None = field(default=None, repr=False)

    def precision_context(self) -> AbstractContextManager[Any]:
        """bf16 autocast with the frozen linear weights cast once (and restored exactly), or nothing."""
        precision = resolve_precision(self.config.precision)
        if precision != "bf16":
            return nullcontext()
        stack = ExitStack()
        stack.enter_context(frozen_linear_weights_in_bf16(self.causal_lm))
        stack.enter_context(autocast_for(precision))
        return stack

    def freeze_decoder(self) -> None:
        for parameter in self.causal_lm.parameters():
            parameter.requires_grad_(False)
        self.causal_lm.eval()

    def trained_parameters(self) -> dict[str, torch.Tensor]:
        """What the delta stores: the prompt's vectors and the re-ranker's weights."""
        tensors: dict[str, torch.Tensor] = {}
        if self.prompt is not None:
            tensors["prompt.vectors"] = self.prompt.vectors
        if self.reranker is not None:
            tensors.update({f"reranker.{name}": value for name, value in self.reranker.named_parameters()})
        return tensors

    def passage_tokens(self, dataset: QADataset, passage_id: int) -> list[int]:
        if passage_id not in self._passage_cache:
            ids = self.tokenizer(dataset.passages[passage_id], add_special_tokens=False)["input_ids"]
            self._passage_cache[passage_id] = ids[: self.config.passage_tokens]
        return self._passage_cache[passage_id]

    def context(self, dataset: QADataset, example: QAExample, passage_ids: list[int]) -> list[int]:
        """Token ids of "Passage: p_1\\n\\n ... template(question)" (what follows the soft prompt)."""
        tokenizer = self.tokenizer
        prefix = tokenizer(PASSAGE_PREFIX, add_special_tokens=False)["input_ids"]
        gap = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
        ids: list[int] = []
        for passage_id in passage_ids:
            ids += prefix + self.passage_tokens(dataset, passage_id) + gap
        question = tokenizer(example.question, add_special_tokens=False)["input_ids"][: self.config.question_tokens]
        head, _, tail = self.question_template.partition("{question}")
        return (
            ids
            + tokenizer(head, add_special_tokens=False)["input_ids"]
            + question
            + tokenizer(tail, add_special_tokens=False)["input_ids"]
        )

    def answer_ids(self, answer: str) -> list[int]:
        """The target continuation: a space, the answer, a newline (which ends generation)."""
        return self.tokenizer(" " + answer.strip() + "\n", add_special_tokens=False)["input_ids"]

    def stop_tokens(self) -> set[int]:
        """Every token whose text holds a newline (an answer is one line), and end-of-text."""
        if self._stop_tokens is None:
            vocabulary = self.tokenizer.get_vocab().values()
            self._stop_tokens = {i for i in vocabulary if "\n" in self.tokenizer.decode([i])}
            if self.tokenizer.eos_token_id is not None:
                self._stop_tokens.add(self.tokenizer.eos_token_id)
        return self._stop_tokens


# ------------------------------------------------------------------------------------------- retrieval


def candidates_for(
    index: BM25Index, dataset: QADataset, examples: list[QAExample], depth: int
) -> tuple[np.ndarray, np.ndarray]:
    """BM25's `depth` best passages per question, the question's own passage left out where it must be."""
    exclude = [[e.passage_id] if dataset.exclude_own_passage and e.passage_id is not None else [] for e in examples]
    return index.retrieve([e.question for e in examples], depth, exclude)


def ranked_passages(
    reader: FrozenReader, dataset: QADataset, examples: list[QAExample], ids: np.ndarray, scores: np.ndarray, top_k: int
) -> list[list[int]]:
    """The `top_k` passages each question's reader reads: re-ranked when the reader has a re-ranker."""
    if top_k == 0:
        return [[] for _ in examples]
    if reader.reranker is None:
        return [list(map(int, row[:top_k])) for row in ids]
    with torch.no_grad():
        order = _rerank_scores(reader, reader.reranker, dataset, examples, ids, scores).argsort(dim=1, descending=True)
    return [[int(ids[row, column]) for column in order[row, :top_k]] for row in range(len(examples))]


def _rerank_scores(
    reader: FrozenReader,
    reranker: Reranker,
    dataset: QADataset,
    examples: list[QAExample],
    ids: np.ndarray,
    scores: np.ndarray,
) -> torch.Tensor:
    questions, passages = _candidate_vectors(reader, dataset, examples, ids)
    return reranker(questions, passages, torch.tensor(scores, dtype=torch.float32))


def _candidate_vectors(
    reader: FrozenReader, dataset: QADataset, examples: list[QAExample], ids: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """The re-ranker's frozen inputs: mean input embeddings of each question (n, d) and candidate (n, N, d)."""
    embeddings = word_embeddings(reader.causal_lm)
    questions = mean_embeddings(
        embeddings, [reader.tokenizer(e.question, add_special_tokens=False)["input_ids"] for e in examples]
    )
    flat = [reader.passage_tokens(dataset, int(i)) for i in ids.reshape(-1)]
    return questions, mean_embeddings(embeddings, flat).reshape(ids.shape[0], ids.shape[1], -1)


# ------------------------------------------------------------------------------------------- training


def _log(config: ReaderConfig, message: str) -> None:
    if not config.quiet:
        print(message, file=sys.stderr, flush=True)


def train_reranker(
    reader: FrozenReader, dataset: QADataset, examples: list[QAExample], ids: np.ndarray, scores: np.ndarray
) -> list[float]:
    """Fit the re-ranker to put passages that contain an answer first; returns the loss per step."""
    config = reader.config
    reranker = reader.reranker = Reranker(
        word_embeddings(reader.causal_lm).weight.shape[1], config.reranker_rank, config.seed
    )
    positive = torch.tensor(
        [
            [contains_answer(dataset.passages[int(i)], e.answers) for i in row]
            for row, e in zip(ids, examples, strict=True)
        ],
        dtype=torch.bool,
    )
    optimizer = torch.optim.AdamW(reranker.parameters(), lr=config.reranker_learning_rate, weight_decay=0.0)
    rng = random.Random(config.seed)
    usable = [i for i in range(len(examples)) if bool(positive[i].any())]
    questions, passages = _candidate_vectors(reader, dataset, examples, ids)  # frozen: computed once
    bm25 = torch.tensor(scores, dtype=torch.float32)
    losses = []
    for _ in range(config.reranker_steps if usable else 0):
        batch = rng.sample(usable, min(32, len(usable)))
        batch_scores = reranker(questions[batch], passages[batch], bm25[batch])
        loss = reranker_loss(batch_scores, positive[batch])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def train_prompt(
    reader: FrozenReader, dataset: QADataset, examples: list[QAExample], passages: list[list[int]]
) -> list[float]:
    """Prompt tuning of the frozen reader on the gold answers; returns the loss per step."""
    config = reader.config
    embeddings = word_embeddings(reader.causal_lm)
    init_ids = reader.tokenizer(config.prompt_init_text, add_special_tokens=False)["input_ids"]
    reader.prompt = SoftPrompt(embeddings, init_ids, config.prompt_tokens)
    optimizer = torch.optim.AdamW(reader.prompt.parameters(), lr=config.learning_rate, weight_decay=0.0)
    rng = random.Random(config.seed)
    contexts = [reader.context(dataset, e, p) for e, p in zip(examples, passages, strict=True)]
    answers = [reader.answer_ids(e.answers[0]) for e in examples]
    warmup = max(1, config.steps // 10)
    order: list[int] = []
    losses = []
    for step in range(config.steps):
        raise_if_requested()  # a Ctrl-C swallowed by a destructor (see deltatune.interrupts)
        if len(order) < config.batch_size:
            order += rng.sample(range(len(examples)), len(examples))
        batch, order = order[: config.batch_size], order[config.batch_size :]
        factor = (step + 1) / warmup if step < warmup else max(0.0, (config.steps - step) / (config.steps - warmup))
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate * factor
        loss = answer_loss(reader.causal_lm, [contexts[i] for i in batch], [answers[i] for i in batch], reader.prompt)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reader.prompt.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if (step + 1) % 10 == 0:
            _log(config, f"reader prompt step {step + 1}/{config.steps}: loss {np.mean(losses[-10:]):.4f}")
    return losses


def train_reader(reader: FrozenReader, dataset: QADataset, index: BM25Index | None) -> dict:
    """Train the re-ranker (when config.rerank and top_k > 0) and the soft prompt (when prompt_tokens > 0);
    the decoder's weights are checked to be bit-identical afterwards."""
    config = reader.config
    reader.freeze_decoder()
    before = frozen_weights_digest(reader.causal_lm)
    examples = list(dataset.split("train"))
    random.Random(config.seed).shuffle(examples)
    examples = examples[: config.train_examples] if config.train_examples else examples
    if not examples:
        raise DeltatuneError(f"{dataset.name} has no training questions; the reader has nothing to learn from.")
    started = time.perf_counter()
    reranker_losses: list[float] = []
    passages: list[list[int]] = [[] for _ in examples]
    if config.top_k:
        ids, scores = candidates_for(_reading_index(index), dataset, examples, config.candidates)
        reranker_losses = train_reranker(reader, dataset, examples, ids, scores) if config.rerank else []
        passages = ranked_passages(reader, dataset, examples, ids, scores, config.top_k)
    with reader.precision_context():
        prompt_losses = train_prompt(reader, dataset, examples, passages) if config.prompt_tokens else []
    after = frozen_weights_digest(reader.causal_lm)
    if after != before:
        raise RuntimeError("the frozen decoder's weights changed during reader training")
    return {
        "train_questions": len(examples),
        "train_time_s": time.perf_counter() - started,
        "reranker_loss_first_10": float(np.mean(reranker_losses[:10])) if reranker_losses else None,
        "reranker_loss_last_10": float(np.mean(reranker_losses[-10:])) if reranker_losses else None,
        "prompt_loss_first_10": float(np.mean(prompt_losses[:10])) if prompt_losses else None,
        "prompt_loss_last_10": float(np.mean(prompt_losses[-10:])) if prompt_losses else None,
        "decoder_weights_sha256": after,
        "precision": resolve_precision(config.precision),
        "prompt_losses": prompt_losses,
    }


# ------------------------------------------------------------------------------------------- answering


def answer_questions(
    reader: FrozenReader,
    dataset: QADataset,
    examples: list[QAExample],
    index: BM25Index | None,
    top_k: int,
    use_prompt: bool = True,
    use_reranker: bool = True,
) -> tuple[list[str], dict]:
    """Answers for `examples` reading `top_k` passages (0: closed-book); returns (answers, retrieval facts)."""
    config = reader.config
    facts: dict = {"top_k": top_k}
    if top_k:
        ids, scores = candidates_for(_reading_index(index), dataset, examples, max(config.candidates, top_k))
        saved = reader.reranker
        reader.reranker = saved if use_reranker else None
        try:
            passages = ranked_passages(reader, dataset, examples, ids, scores, top_k)
        finally:
            reader.reranker = saved
        facts["answer_in_passages"] = float(
            np.mean(
                [
                    any(contains_answer(dataset.passages[p], e.answers) for p in chosen)
                    for e, chosen in zip(examples, passages, strict=True)
                ]
            )
        )
    else:
        passages = [[] for _ in examples]
    contexts = [reader.context(dataset, e, p) for e, p in zip(examples, passages, strict=True)]
    with reader.precision_context():
        generated = generate_answers(
            reader.causal_lm,
            contexts,
            reader.prompt if use_prompt else None,
            config.answer_tokens,
            reader.stop_tokens(),
            config.eval_batch_size,
        )
    answers = []
    for answer_ids in generated:
        text = reader.tokenizer.decode(answer_ids, skip_special_tokens=True)
        assert isinstance(text, str)  # one sequence of ids decodes to one string
        answers.append(text.strip())
    return answers, facts


def _reading_index(index: BM25Index | None) -> BM25Index:
    if index is None:
        raise DeltatuneError("Reading passages needs a retrieval index over the corpus.")
    return index


def score_answers(predictions: list[str], examples: list[QAExample]) -> dict:
    """Exact match and F1 (SQuAD's definitions), as means and per question."""
    em = [exact_match(p, e.answers) for p, e in zip(predictions, examples, strict=True)]
    f1 = [token_f1(p, e.answers) for p, e in zip(predictions, examples, strict=True)]
    return {
        "exact_match": float(np.mean(em)) if em else 0.0,
        "f1": float(np.mean(f1)) if f1 else 0.0,
        "per_question": {"exact_match": em, "f1": f1},
    }


__all__ = [
    "CLOZE_QUESTION_TEMPLATE",
    "DEFAULT_QUESTION_TEMPLATE",
    "FrozenReader",
    "answer_questions",
    "candidates_for",
    "ranked_passages",
    "score_answers",
    "train_reader",
]
