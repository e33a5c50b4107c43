"""Many task deltas on one frozen backbone: the library (`load_many`) and the HTTP server (`deltatune serve`).

    served = deltatune.load_many(["runs/stsb-lora", "runs/sentiment-bitfit", "runs/spam-ia3"])
    served.predict([("A man plays.", "A person plays."), "a great film"], task=["stsb", "rotten-tomatoes"])

The base model is loaded and fingerprint-checked once; each delta attaches under its own name (its
task's name by default). A batch may mix tasks row by row: deltas of methods that declare
`batch_mixing = "per-row"` share one forward pass (each row gathers its own delta's tensors), the
others run one forward pass per delta present; each row's own head turns the shared forward's hidden
states into its task's outputs. `deltatune.serve.app` (FastAPI, imported only by `deltatune serve`)
puts this behind HTTP with dynamic batching across tasks.
"""

from deltatune.serve.multi import MultiTaskModel, ServedTask, load_many

__all__ = ["MultiTaskModel", "ServedTask", "load_many"]
