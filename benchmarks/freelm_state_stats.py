"""`python benchmarks/freelm_state_stats.py`: statistics of SmolLM2-135M's last-token states on 256 FreeLM training propositions (the head's input)."""

import json

import torch

from deltatune.freelm.config import FreeLMConfig
from deltatune.freelm.model import build_freelm_model
from deltatune.freelm.scoring import encode_propositions
from deltatune.freelm.training import build_proposition_set, last_token_states
from deltatune.sources.data import load_task_data
from deltatune.sources.models import load_causal_lm

torch.set_num_threads(1)
config = FreeLMConfig(max_examples_per_task=200)
data = [load_task_data(t) for t in config.train_tasks]
lm, tok = load_causal_lm("smollm2-135m")
model = build_freelm_model(lm)
props = build_proposition_set(data, tok, config)
encoded = encode_propositions(tok, props.texts, props.labels, config.max_length)
states = last_token_states(model, encoded, tok.pad_token_id, 0, "fp32", count=256)
mean, std = states.mean(0), states.std(0)
out = {
    "propositions": len(states),
    "state_norm_mean": float(states.norm(dim=1).mean()),
    "mean_state_norm": float(mean.norm()),
    "per_dimension_spread_mean": float(std.mean()),
    "largest_mean_dimensions": {int(i): round(float(mean[i]), 2) for i in mean.abs().topk(5).indices},
    "share_of_squared_norm_in_mean": float(mean.norm() ** 2 / (states.norm(dim=1) ** 2).mean()),
}
print(json.dumps(out, indent=1))
