"""deltatune: adapt pretrained language models cheaply, ship each task as a tiny delta, and
find out which way of adapting is best.

    import deltatune
    record = deltatune.train("minilm-l6", task="stsb", method="bitfit", out="runs/stsb-bitfit", epochs=3)
    tuned = deltatune.load("runs/stsb-bitfit")
    tuned.predict("A man is playing a guitar.", "A person plays an instrument.")
    tuned.evaluate("test")
"""

from __future__ import annotations

__version__ = "0.1.0"

from deltatune.errors import DeltatuneError


def train(model: str = "minilm-l6", *, task: str | None = None, method: str = "full",
          out: str | None = None, method_options: dict | None = None, source: str = "auto",
          data: dict | None = None, overwrite: bool = False, say=None, **train_options) -> dict:
    """Train `method` on `model` for a catalog `task` (or your own `data`, see `deltatune.data_record`).

    `train_options` are `TrainConfig` fields (epochs=3, learning_rate=1e-3, lr_search="auto", head="bi-encoder",
    ...). `say` (e.g. `print`) hears how a learning-rate search goes. Returns the run record; with `out` the
    delta and record are saved there.
    """
    from deltatune.config import build_config
    from deltatune.run import data_record, run_training
    from deltatune.training import TrainConfig

    if (task is None) == (data is None):
        raise DeltatuneError("Pass exactly one of task= (a catalog task name) or data= (a data record).")
    config = build_config(TrainConfig, train_options)
    return run_training(model, data or data_record(task, source=source), method, method_options, config,
                        out=out, overwrite=overwrite, say=say)


def load(directory, base: str | None = None):
    """A saved delta applied to its base model: `.predict(...)`, `.evaluate(split)`."""
    from deltatune.delta import load as load_delta

    return load_delta(directory, base=base)


def data_record(name: str, *, source: str = "auto", local: dict | None = None) -> dict:
    """Describe training data: a catalog task, or `local={'path': ..., 'text_fields': [...], ...}`."""
    from deltatune.run import data_record as make

    return make(name, source=source, local=local)


__all__ = ["DeltatuneError", "train", "load", "data_record", "__version__"]
