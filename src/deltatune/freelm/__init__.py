"""FreeLM (Li et al. 2023, arXiv:2305.01616): a language model trained with a language signal and a
task-aware teacher signal in one proposition format, which then answers tasks it never saw without
per-task fine-tuning.

    from deltatune.freelm import FreeLMConfig, run_freelm_training, evaluate_freelm
    run_freelm_training("smollm2-135m", FreeLMConfig(train_tasks=("snli", "trec")), out="runs/freelm")
    report = evaluate_freelm("runs/freelm", ["sms-spam", "stsb"])

Modules: `config` (FreeLMConfig), `model` (the teacher head on a shared decoder), `schedule` (which
signal each step trains), `training` (`train_freelm`), `scoring` (proposition scoring and the
LM-scoring baselines), `artifact` (run, save, load), `evaluation` (the zero-shot comparison table),
`command` (the `deltatune freelm` subcommands). Names are imported on first use, so the command
line does not pay for torch models it does not build.
"""

from importlib import import_module

_EXPORTS = {
    "FreeLMConfig": "config",
    "FreeLMModel": "model",
    "PROPOSITION_TASK": "model",
    "build_freelm_model": "model",
    "LANGUAGE": "schedule",
    "TEACHER": "schedule",
    "signal_schedule": "schedule",
    "FreeLMResult": "training",
    "train_freelm": "training",
    "proposition_scores": "scoring",
    "verbaliser_scores": "scoring",
    "load_freelm": "artifact",
    "run_freelm_training": "artifact",
    "evaluate_freelm": "evaluation",
    "format_table": "evaluation",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'deltatune.freelm' has no attribute {name!r}")
    return getattr(import_module(f"deltatune.freelm.{_EXPORTS[name]}"), name)


__all__ = sorted(_EXPORTS)
