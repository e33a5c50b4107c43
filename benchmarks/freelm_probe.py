"""FreeLM diagnostic (`python benchmarks/freelm_probe.py rotten-tomatoes`): can a linear head on the frozen decoder's last-token state judge propositions?

For rotten-tomatoes: features h_last of (a) the review alone (sentiment probe: what prompt tuning's
head needs) and (b) each candidate proposition (what FreeLM's teacher head reads). Logistic
regression on train features, accuracy on dev: (a) sentiment; (b) true/false per proposition and
the best-scoring proposition per example.
"""

import sys
import time

import numpy as np
import torch

from deltatune.batching import stratified_subset
from deltatune.sources.data import load_task_data
from deltatune.sources.models import load_causal_lm
from deltatune.tasks.propositions import propositions_for

torch.set_num_threads(2)
task = sys.argv[1] if len(sys.argv) > 1 else "rotten-tomatoes"
n_train, n_dev = 300, 150
lm, tok = load_causal_lm("smollm2-135m")
lm.eval()
print(
    "pad",
    tok.pad_token,
    tok.pad_token_id,
    "eos",
    tok.eos_token_id,
    "bos",
    tok.bos_token_id,
    "ids of 'a b'",
    tok("a b")["input_ids"],
    "padding side",
    tok.padding_side,
    flush=True,
)
data = load_task_data(task)
P = propositions_for(data.task)


@torch.no_grad()
def feats(texts):
    out = []
    for i in range(0, len(texts), 16):
        enc = tok(texts[i : i + 16], return_tensors="pt", padding=True, truncation=True, max_length=128)
        h = lm.model(**enc).last_hidden_state
        last = enc["attention_mask"].sum(1) - 1
        out.append(h[torch.arange(len(last)), last].float())
    return torch.cat(out).numpy()


def fit(X, y, Xd, yd, steps=300, l2=1e-3):
    mu, sd = X.mean(0), X.std(0) + 1e-6
    X = torch.tensor((X - mu) / sd)
    Xd = torch.tensor((Xd - mu) / sd)
    y = torch.tensor(y)
    w = torch.zeros(X.shape[1], 2, requires_grad=True)
    b = torch.zeros(2, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(X @ w + b, y) + l2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        train_acc = ((X @ w + b).argmax(1) == y).float().mean().item()
        logits = Xd @ w + b
    return train_acc, logits


tr, dv = data.split("train"), data.split("dev")
ti = stratified_subset(tr.labels, n_train, 0, False)
di = stratified_subset(dv.labels, n_dev, 0, False)
ytr = np.array([tr.labels[i] for i in ti])
ydv = np.array([dv.labels[i] for i in di])
t0 = time.time()
# (a) input alone with the task's prompt (what a prompt-tuned classifier reads)
Xa = feats([P.filled_prompt(tr.texts[i]) for i in ti])
Xad = feats([P.filled_prompt(dv.texts[i]) for i in di])
acc_tr, logits = fit(Xa, ytr, Xad, ydv)
print(
    f"(a) label probe on the prompt alone: train {acc_tr:.3f} dev {(logits.argmax(1).numpy() == ydv).mean():.3f}",
    flush=True,
)
C = P.num_candidates
for template in range(len(P.templates)):
    props_tr = [P.proposition(tr.texts[i], c, template) for i in ti for c in range(C)]
    props_dv = [P.proposition(dv.texts[i], c, template) for i in di for c in range(C)]
    Xb, Xbd = feats(props_tr), feats(props_dv)
    yb = np.array([int(c == ytr[k]) for k in range(len(ti)) for c in range(C)])
    ybd = np.array([int(c == ydv[k]) for k in range(len(di)) for c in range(C)])
    acc_tr, logits = fit(Xb, yb, Xbd, ybd)
    s = (logits[:, 1] - logits[:, 0]).numpy().reshape(len(di), C)
    print(
        f"(b) template {template}: truth probe train {acc_tr:.3f} dev {(logits.argmax(1).numpy() == ybd).mean():.3f}; "
        f"best-scoring proposition dev accuracy {(s.argmax(1) == ydv).mean():.3f}",
        flush=True,
    )
    # (c) the same features, label probe: does the proposition's state still carry the input's label?
    yc = np.repeat(ytr, C)
    ycd = np.repeat(ydv, C)
    acc_tr, logits = fit(Xb, yc, Xbd, ycd)
    print(
        f"(c) template {template}: label probe on proposition states dev {(logits.argmax(1).numpy() == ycd).mean():.3f}",
        flush=True,
    )
print(f"{time.time() - t0:.0f} s")
