"""Prediction at each precision: bf16 casts the linear weights once per call and puts them back exactly."""

import torch

from conftest import build_tiny_model, build_tokenizer
from deltatune.batching import encode, predict_encoded
from deltatune.tasks.spec import Split
from test_training import SENTIMENT


def test_bf16_prediction_is_close_to_fp32_and_leaves_the_weights_exact():
    model, tokenizer = build_tiny_model("bert", seed=2), build_tokenizer()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    texts = ["the dog plays", "a very sad film", "great song really good", "not good"] * 5
    encoded = encode(tokenizer, SENTIMENT, Split([(t,) for t in texts], [0] * len(texts)), 32)
    exact = predict_encoded(model, encoded, SENTIMENT, 0, 8, "fp32")
    fast = predict_encoded(model, encoded, SENTIMENT, 0, 8, "bf16")
    assert fast.shape == exact.shape and abs(fast - exact).max() < 0.05
    assert not (fast == exact).all()  # bf16 really ran
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, before[name]), name
