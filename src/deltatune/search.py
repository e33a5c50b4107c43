"""Each method at its own best learning rate: a search over candidates by successive halving on dev.

A comparison of methods at one fixed learning rate measures the learning rate as much as the method:
BitFit's biases need about a hundred times full fine-tuning's rate. So every candidate rate trains from
the same start (the same head initialisation, the same method initialisation, the same batches), and at
each rung, a fraction of the planned steps (successive halving: Jamieson & Talwalkar 2016; Li et al. 2018,
Hyperband), the remaining candidates are scored on a fixed stratified part of dev (`RUNG_DEV_EXAMPLES`,
at least 500 examples) and the better half (rounded up) goes on:

    4 candidates, rungs (1/8, 1/4):  4 train to 1/8 of the plan, the best 2 to 1/4, the best 1 to the end
                                      training 4/8 + 2/8 + 3/4 = 1.5 runs instead of 4

Each candidate's learning-rate schedule is laid over the whole planned run, and a paused candidate keeps
its batch order and its random state and gains no evaluation from the pause, so the survivor has trained,
been evaluated and kept its checkpoint exactly as a single run at its rate would have. Scoring the rungs on
part of dev keeps their cost (every live candidate, at every rung) to about a quarter of full
evaluations. The test split plays no part: it is scored once, on the survivor's kept state.

A chosen rate that is the lowest or the highest candidate (`rate_at_edge`) says the best rate may lie outside
the range searched: the run's summary, `deltatune compare`'s report and the methods table say so, with a
range that reaches past it. With `lr_search_extend` N the search goes past that end itself: up to N more rates,
one step further each (the ratio of the two candidates nearest that end), each a whole run from the same
start, the better on dev kept, until it keeps a rate inside the range.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from deltatune.errors import DeltatuneError

if TYPE_CHECKING:  # the report reads `rate_at_edge` without importing torch
    from deltatune.training import TrainConfig, Trainer

FALLBACK_FACTORS = (1 / 3, 1.0, 3.0)
"""Candidates around the default learning rate for a method that declares none of its own."""


def learning_rate_candidates(config: TrainConfig, method) -> tuple[float, ...]:
    """The rates `config.lr_search` asks for: its own list, or the method's (`learning_rate_candidates`)."""
    if config.lr_search is None:
        raise DeltatuneError("lr_search is not set: there is nothing to search")
    if config.lr_search != "auto":
        return tuple(sorted(set(config.lr_search)))
    if config.regime == "mezo":
        from deltatune.regimes import mezo_learning_rates

        return tuple(sorted(mezo_learning_rates(method)))
    declared = getattr(method, "learning_rate_candidates", None)
    if declared:
        return tuple(sorted(declared))
    default = getattr(method, "default_learning_rate", 5e-5)
    return tuple(float(f"{default * factor:.3g}") for factor in FALLBACK_FACTORS)


def search_cost(num_candidates: int, rungs: Sequence[float]) -> float:
    """Planned training of the whole search in units of one full run (no early stopping), e.g. 1.5."""
    cost, alive, done = 0.0, num_candidates, 0.0
    for rung in rungs:
        if alive <= 1:
            break
        cost += alive * (rung - done)
        alive, done = math.ceil(alive / 2), rung
    return cost + alive * (1.0 - done)


def rate_at_edge(search: dict) -> str | None:
    """Where a search's chosen rate sits when it is an end of the candidates' range: "lowest" or "highest";
    None inside the range (or with one candidate)."""
    return _end_of(sorted(candidate["learning_rate"] for candidate in search["candidates"]), search["chosen"])


def _end_of(rates: Sequence[float], chosen: float) -> str | None:
    """`rate_at_edge` over sorted `rates`."""
    if len(rates) < 2:
        return None
    if chosen == rates[0]:
        return "lowest"
    return "highest" if chosen == rates[-1] else None


def widened_range(search: dict) -> tuple[float, ...]:
    """Three rates centred on a chosen rate at the edge of `search`'s range: one step past it (the step the two
    candidates nearest that end are apart, as a ratio), the chosen rate, and its neighbour inside."""
    rates = sorted(candidate["learning_rate"] for candidate in search["candidates"])
    edge = rate_at_edge(search)
    assert edge is not None, "widened_range is for a search that chose an end of its range"
    end_pair = rates[:2] if edge == "lowest" else rates[-2:]
    return tuple(sorted((_one_step_past(rates, edge), *end_pair)))


def _one_step_past(rates: Sequence[float], edge: str) -> float:
    """The rate one step past the `edge` end of sorted `rates`, the step being the ratio of the two rates
    nearest that end, to 2 significant digits: 8e-6 below 2e-5, 5e-5; 0.009 above 0.001, 0.003."""
    inner, outer = (rates[1], rates[0]) if edge == "lowest" else (rates[-2], rates[-1])
    return float(f"{outer * outer / inner:.2g}")


def edge_note(search: dict) -> str | None:
    """A sentence for a user whose search chose a rate at the edge of its range; None otherwise."""
    edge = rate_at_edge(search)
    if edge is None:
        return None
    direction = "below" if edge == "lowest" else "above"
    suggestion = ",".join(f"{rate:g}" for rate in widened_range(search))
    return (
        f"the chosen learning rate {search['chosen']:g} is the {edge} candidate searched, so the best may lie "
        f"{direction} it; search a range that reaches past it (e.g. --lr-search {suggestion}, or let the search "
        + (
            "go further past it with a larger --lr-search-extend)"
            if any(candidate.get("extension") for candidate in search["candidates"])
            else "go on past it with --lr-search-extend 2)"
        )
    )


@dataclass
class Candidate:
    learning_rate: float
    trainer: Trainer
    rung_scores: list[float] = field(default_factory=list)
    """Its score on the rung part of dev at each rung it reached."""
    stopped_at_rung: int | None = None
    extension: bool = False
    """Trained past the end of the range after the search chose that end (`lr_search_extend`): a whole run,
    judged by its best dev score, with no rungs."""

    @property
    def best(self) -> float:
        """Its best dev score so far (-inf before any evaluation; NaN evaluations never count)."""
        return self.trainer.best.value

    def rank_score(self) -> float:
        """Its score at the latest rung; a candidate that diverged ranks last, whatever its state scores."""
        value = self.rung_scores[-1]
        return -math.inf if math.isnan(value) or self.trainer.diverged is not None else value

    def describe(self) -> dict:
        return {
            "learning_rate": self.learning_rate,
            "rung_scores": self.rung_scores,
            "best_dev": None if self.best == -math.inf else self.best,
            "best_step": self.trainer.best.step,
            "steps": self.trainer.step,
            "train_time_s": round(self.trainer.train_time, 3),
            "stopped_at_rung": self.stopped_at_rung,
            "stopped_by": self.trainer.stopped_by,
            **({"diverged": self.trainer.diverged} if self.trainer.diverged is not None else {}),
            **({"extension": True} if self.extension else {}),
        }

    def final_key(self) -> tuple[bool, float]:
        """How the candidates that trained to the end are compared: a diverged one is chosen only when every one
        diverged (its message then reaches the user), then the best dev score."""
        return self.trainer.diverged is None, self.best


@dataclass
class SearchResult:
    """The survivor's trainer (its `finish()` gives the run's result) and what the search saw."""

    trainer: Trainer
    record: dict
    """Candidates, rungs, every candidate's dev scores at the rungs, the chosen rate, the total cost."""


def successive_halving(
    make_trainer: Callable[[float], Trainer],
    learning_rates: Sequence[float],
    rungs: Sequence[float],
    metric: str,
    say: Callable[[str], None] | None = None,
    extend: int = 0,
) -> SearchResult:
    """Run the search; every trainer but the survivor's is closed. See the module docstring. `extend`: at most
    this many rates past an end of the range that the search chose (`TrainConfig.lr_search_extend`)."""
    candidates: list[Candidate] = []
    try:
        for rate in learning_rates:
            candidates.append(Candidate(rate, make_trainer(rate)))
        chosen = _halve(candidates, rungs, metric, say)
        for _ in range(extend):
            edge = _end_of(sorted(c.learning_rate for c in candidates), chosen.learning_rate)
            if edge is None or chosen.trainer.diverged is not None:  # inside the range, or nothing trained
                break
            chosen = _train_past(candidates, chosen, edge, make_trainer, len(rungs), metric, say)
        return SearchResult(chosen.trainer, _search_record(candidates, chosen, rungs, metric))
    except BaseException:
        for candidate in candidates:  # closing twice is a no-op: losers were closed when they stopped
            candidate.trainer.close(failed=True)
        raise


def _halve(
    candidates: list[Candidate], rungs: Sequence[float], metric: str, say: Callable[[str], None] | None
) -> Candidate:
    alive = list(candidates)
    for index, rung in enumerate(rungs):
        if len(alive) <= 1:
            break
        for candidate in alive:
            candidate.trainer.advance(rung)
            candidate.rung_scores.append(candidate.trainer.rung_score())
        # stable sort: on a tie the smaller rate (listed first) goes on
        ranked = sorted(alive, key=lambda c: -c.rank_score())
        keep = math.ceil(len(alive) / 2)
        for candidate in ranked[keep:]:
            candidate.stopped_at_rung = index
            candidate.trainer.close()
        alive = ranked[:keep]
        if say is not None:
            say(
                f"rung {index + 1} at {rung:g} of the plan: "
                + ", ".join(
                    f"lr {c.learning_rate:g} {metric} {c.rung_scores[-1]:.4f}" + ("" if c in alive else " (stopped)")
                    for c in ranked
                )
            )
    for candidate in alive:
        candidate.trainer.advance()
    chosen = max(alive, key=Candidate.final_key)
    for candidate in alive:
        if candidate is not chosen:
            candidate.stopped_at_rung = len(rungs)
            candidate.trainer.close()
    return chosen


def _train_past(
    candidates: list[Candidate],
    chosen: Candidate,
    edge: str,
    make_trainer: Callable[[float], Trainer],
    end_rung: int,
    metric: str,
    say: Callable[[str], None] | None,
) -> Candidate:
    """Train one rate past the `edge` end of the candidates' range as a whole run; the better on dev is kept."""
    rate = _one_step_past(sorted(c.learning_rate for c in candidates), edge)
    extension = Candidate(rate, make_trainer(rate), extension=True)
    candidates.append(extension)
    extension.trainer.advance()
    kept = max((chosen, extension), key=Candidate.final_key)  # a tie keeps the rate inside the range
    dropped = extension if kept is chosen else chosen
    dropped.stopped_at_rung = end_rung
    dropped.trainer.close()
    if say is not None:
        say(
            f"lr {chosen.learning_rate:g} was the {edge} candidate: lr {rate:g}, past it, trained too; "
            f"{metric} {chosen.best:.4f} against {extension.best:.4f}: lr {kept.learning_rate:g} kept"
        )
    return kept


def _search_record(candidates: list[Candidate], chosen: Candidate, rungs: Sequence[float], metric: str) -> dict:
    extensions = sum(c.extension for c in candidates)
    return {
        "candidates": [c.describe() for c in candidates],
        "rungs": list(rungs),
        "metric": metric,
        "chosen": chosen.learning_rate,
        "split": "dev",
        "rung_examples": len(chosen.trainer.data.rung_dev),
        "planned_cost_runs": search_cost(len(candidates) - extensions, rungs) + extensions,
        "train_time_s": round(sum(c.trainer.train_time for c in candidates), 3),
        "steps": sum(c.trainer.step for c in candidates),
    }


__all__ = [
    "learning_rate_candidates",
    "search_cost",
    "successive_halving",
    "SearchResult",
    "rate_at_edge",
    "widened_range",
    "edge_note",
]
