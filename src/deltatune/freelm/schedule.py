"""Which signal each FreeLM optimizer step trains: the language signal or the teacher signal.

FreeLM (Li et al. 2023, arXiv:2305.01616) trains one model *iteratively*: a language stage
(next-token loss on raw text) and a teacher stage (proposition correctness) take turns, so each
signal keeps correcting what the other pulls away; the abstract calls this training "in an
interactive manner". (Only the abstract could be read offline; the stage lengths below are
deltatune's choices, configurable.) Two schedules realise it:

  ratio        every step picks one signal so that, after any number of steps, the counts are as
               close as integers allow to lm_ratio language steps per teacher step, spread evenly
               (lm_ratio=2: T L L T L L ...; lm_ratio=0.5: T T L T T L ...). The finest-grained
               alternation: neither signal is ever left untrained for long.
  interactive  the paper's stage-wise alternation: a language stage of round(lm_ratio·stage_steps)
               steps, then a teacher stage of stage_steps steps, and again (stage_steps=1,
               lm_ratio=1 is strict one-for-one alternation L T L T ...). Longer stages let each
               signal make sustained progress before the other takes over.

Both keep lm_ratio over every complete cycle; lm_ratio=0 trains the teacher signal alone (the
ablation without language signal).
"""

from __future__ import annotations

from fractions import Fraction
from typing import Literal

from deltatune.errors import DeltatuneError

LANGUAGE = "language"
TEACHER = "teacher"

Schedule = Literal["ratio", "interactive"]


def signal_schedule(total_steps: int, lm_ratio: float, schedule: Schedule = "ratio", stage_steps: int = 1) -> list[str]:
    """The signal of each of `total_steps` steps, LANGUAGE or TEACHER."""
    if lm_ratio < 0:
        raise DeltatuneError(f"lm_ratio={lm_ratio} must be 0 or more (language steps per teacher step).")
    if stage_steps < 1:
        raise DeltatuneError(f"stage_steps={stage_steps} must be at least 1.")
    if schedule == "ratio":
        # the language share of steps as an exact fraction, so long runs never drift from the ratio
        share = Fraction(lm_ratio).limit_denominator(1000) / (1 + Fraction(lm_ratio).limit_denominator(1000))
        return [LANGUAGE if (step + 1) * share // 1 > step * share // 1 else TEACHER for step in range(total_steps)]
    if schedule == "interactive":
        language_stage = round(lm_ratio * stage_steps)
        cycle = [LANGUAGE] * language_stage + [TEACHER] * stage_steps
        return [cycle[step % len(cycle)] for step in range(total_steps)]
    raise DeltatuneError(f"schedule={schedule!r} must be 'ratio' or 'interactive'.")


__all__ = ["LANGUAGE", "TEACHER", "Schedule", "signal_schedule"]
