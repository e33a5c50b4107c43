"""Retrieval for the frozen reader: BM25 over the passage corpus (the `bm25s` library).

BM25 (Robertson & Zaragoza 2009) scores a passage p for a question q as
    Σ_{t ∈ q} idf(t) · f(t, p) (k1 + 1) / (f(t, p) + k1 (1 − b + b |p| / avgdl)),
with bm25s's defaults (k1 = 1.5, b = 0.75, Lucene's idf), English stop words removed. Levine et al.
2022 retrieve with BM25 or a dense retriever and then re-rank; here BM25 gives the candidates and a
small trained re-ranker (`deltatune.reader.model.Reranker`) may reorder them.

A question written from one of the corpus's passages (a cloze question) must not find that passage:
`retrieve` takes, per question, passage ids to leave out.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from deltatune.errors import DeltatuneError


class BM25Index:
    """A BM25 index over `passages`; `retrieve` returns passage ids and scores, best first."""

    def __init__(self, passages: Sequence[str]) -> None:
        try:
            import bm25s
        except ImportError:
            raise DeltatuneError(
                "The frozen reader's retrieval needs the `bm25s` package: "
                "pip install 'deltatune[reader]' (or pip install bm25s)."
            ) from None
        if not passages:
            raise DeltatuneError("The passage corpus is empty: the reader needs passages to retrieve from.")
        self._bm25s = bm25s
        self.num_passages = len(passages)
        self._retriever = bm25s.BM25()
        self._retriever.index(bm25s.tokenize(list(passages), stopwords="en", show_progress=False), show_progress=False)

    def retrieve(
        self, questions: Sequence[str], k: int, exclude: Sequence[Sequence[int]] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores), each (len(questions), k): the k best passages per question, without the ids in
        `exclude[i]` for question i (fewer than k columns only when the corpus is smaller). Passages that
        share no word with a question score 0 and still fill its places."""
        if k < 1:
            raise DeltatuneError(f"k={k} passages: retrieve at least 1.")
        spare = max((len(ids) for ids in exclude), default=0) if exclude is not None else 0
        depth = min(self.num_passages, k + spare)
        width = min(k, self.num_passages - spare)
        if width < 1:
            raise DeltatuneError(
                f"The corpus has {self.num_passages} passage(s) and a question leaves {spare} out: "
                "nothing is left to retrieve. Add passages to the corpus."
            )
        tokens = self._bm25s.tokenize(list(questions), stopwords="en", show_progress=False)
        found, scores = self._retriever.retrieve(tokens, k=depth, show_progress=False, n_threads=1)
        ids = np.zeros((len(questions), width), dtype=np.int64)
        kept_scores = np.zeros(ids.shape, dtype=np.float32)
        for row in range(len(questions)):
            left_out = set(exclude[row]) if exclude is not None else set()
            keep = [column for column in range(depth) if int(found[row, column]) not in left_out][: ids.shape[1]]
            ids[row, : len(keep)] = found[row, keep]
            kept_scores[row, : len(keep)] = scores[row, keep]
        return ids, kept_scores


__all__ = ["BM25Index"]
