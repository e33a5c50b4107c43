"""The frozen reader's configuration (its fields are the flags of `deltatune reader train`).

Kept apart from the model code so that building the command line imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from deltatune.config import choice_problems
from deltatune.errors import DeltatuneError


@dataclass(frozen=True)
class ReaderConfig:
    top_k: int = 3
    """Passages the frozen decoder reads per question (0: closed-book, the question alone)."""
    candidates: int = 20
    """BM25 candidates per question that the re-ranker reorders before the top_k are read."""
    rerank: bool = True
    """Train and use the re-ranker (off: the reader reads BM25's top_k)."""
    reranker_rank: int = 64
    """Width r of the re-ranker's projection W ∈ R^{r×d}."""
    prompt_tokens: int = 20
    """Length of the trained soft prompt in front of the reader's input (0: no prompt)."""
    prompt_init_text: str = "Read the passages and answer the question with a short phrase."
    """Text whose token embeddings start the soft prompt."""
    passage_tokens: int = 96
    """Each passage is cut to this many tokens."""
    question_tokens: int = 96
    """The question is cut to this many tokens."""
    answer_tokens: int = 8
    """Greedy decoding stops after this many tokens (or at a newline)."""
    steps: int = 100
    """Optimizer steps for the soft prompt."""
    batch_size: int = 4
    """Questions per prompt step."""
    learning_rate: float = 3e-2
    """Peak learning rate of the soft prompt (linear warm-up over 10% of the steps, then linear decay)."""
    reranker_steps: int = 200
    """Optimizer steps for the re-ranker (cheap: no decoder forward)."""
    reranker_learning_rate: float = 3e-3
    """Learning rate of the re-ranker (AdamW)."""
    train_examples: int = 400
    """Training questions used (the first ones of the train split after a seeded shuffle)."""
    eval_examples: int = 300
    """Questions evaluated per split (seeded subset; 0 for all)."""
    eval_batch_size: int = 8
    """Questions decoded together."""
    seed: int = 0
    """Seeds the training subset, its order, and the re-ranker's initialisation."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """bf16 autocast for the decoder's matmuls (frozen weights cast once, restored exactly), fp32, or auto
    (bf16 on CPUs with native bf16)."""
    threads: int | None = None
    """torch intra-op threads; default: torch's choice."""
    quiet: bool = False
    """No progress lines."""

    def __post_init__(self) -> None:
        problems = []
        for name in ("top_k", "prompt_tokens", "reranker_steps", "eval_examples", "train_examples"):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)} must be 0 or more")
        for name in (
            "candidates",
            "reranker_rank",
            "passage_tokens",
            "question_tokens",
            "answer_tokens",
            "steps",
            "batch_size",
            "eval_batch_size",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be at least 1")
        if self.candidates < self.top_k:
            problems.append(f"candidates={self.candidates} must be at least top_k={self.top_k}")
        for name in ("learning_rate", "reranker_learning_rate"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)} must be positive")
        problems += choice_problems(self)
        if problems:
            raise DeltatuneError("; ".join(problems))


__all__ = ["ReaderConfig"]
