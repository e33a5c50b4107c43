"""The package's public functions, each called twice: a submodule imported on the first call must not
shadow the function of the same name (`deltatune.train` was once replaced by the module `deltatune.train`)."""

import csv

import deltatune
from conftest import make_sentiment_rows, save_tiny_model_dir


def test_each_public_function_works_twice(tmp_path):
    model_dir = save_tiny_model_dir(tmp_path / "tiny-bert", "bert")
    path = tmp_path / "toy.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(make_sentiment_rows(64))
    for attempt in range(2):
        data = deltatune.data_record("toy", local={"path": str(path), "text_fields": ["text"]})
        assert data["kind"] == "local"
        out = tmp_path / f"run-{attempt}"
        record = deltatune.train(
            str(model_dir), data=data, method="bitfit", out=str(out), max_steps=2, batch_size=16, quiet=True
        )
        assert record is not None and record.steps == 2
        tuned = deltatune.load(out)
        (first,) = tuned.predict("the movie is good")
        assert first["label"] in ("negative", "positive")
        assert callable(deltatune.train) and callable(deltatune.load) and callable(deltatune.data_record)
