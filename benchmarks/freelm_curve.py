"""FreeLM diagnostic run: the teacher loss and the seen-task dev accuracy (best-scoring proposition, template 0)
printed every --every steps. `python benchmarks/freelm_curve.py --method bitfit --loss contrastive --lr 1e-3`
(THREADS=1 by default; the numbers in docs/results/freelm-diagnosis.json came from it)."""

import argparse
import json
import time

import torch

from deltatune.freelm.artifact import prepare_freelm_model
from deltatune.freelm.config import FreeLMConfig
from deltatune.freelm.training import seen_task_metrics, train_freelm
from deltatune.methods import build_method
from deltatune.precision import resolve_precision
from deltatune.sources.data import load_task_data, load_text_corpus
from deltatune.sources.models import load_causal_lm
from deltatune.training import peak_memory_bytes, seed_everything

parser = argparse.ArgumentParser()
parser.add_argument("--tasks", default="rotten-tomatoes")
parser.add_argument("--method", default="lora")
parser.add_argument("--opts", default="{}")
parser.add_argument("--lr", type=float, default=1e-3)
parser.add_argument("--steps", type=int, default=120)
parser.add_argument("--lm-ratio", type=float, default=0)
parser.add_argument("--loss", default="binary")
parser.add_argument("--every", type=int, default=20)
parser.add_argument("--dev", type=int, default=60)
parser.add_argument("--batch", type=int, default=16)
parser.add_argument("--max-examples", type=int, default=1000)
parser.add_argument("--precision", default="auto")
args = parser.parse_args()
config = FreeLMConfig(
    train_tasks=tuple(args.tasks.split(",")),
    steps=args.steps,
    lm_ratio=args.lm_ratio,
    teacher_batch_size=args.batch,
    lm_batch_size=2,
    learning_rate=args.lr,
    max_examples_per_task=args.max_examples,
    dev_examples_per_task=args.dev,
    teacher_loss=args.loss,
    quiet=True,
    precision=args.precision,
)
torch.set_num_threads(int(__import__("os").environ.get("THREADS", "1")))
task_data = [load_task_data(t) for t in config.train_tasks]
corpus = load_text_corpus("wikitext-2") if args.lm_ratio else {"train": []}
seed_everything(config.seed)
causal_lm, tokenizer = load_causal_lm("smollm2-135m")
method = build_method(args.method, json.loads(args.opts))
model, names, _, _ = prepare_freelm_model(causal_lm, tokenizer, method)
print(
    f"# {vars(args)} trainable {sum(p.numel() for n, p in model.classifier.named_parameters() if n in names):,}",
    flush=True,
)
precision = resolve_precision(config.precision)
losses, started = [], time.time()


def callback(step, signal, loss):
    if signal == "teacher":
        losses.append(loss)
    if step % args.every == 0 or step == 1:
        metrics = seen_task_metrics(model, tokenizer, task_data, config, None, precision)
        model.train()
        shown = " ".join(f"{t}={m['accuracy']:.3f}" for t, m in metrics.items())
        recent = sum(losses[-args.every :]) / max(1, len(losses[-args.every :]))
        print(f"step {step:4d} teacher_loss {recent:.4f} dev {shown} t={time.time() - started:.0f}s", flush=True)


result = train_freelm(model, tokenizer, task_data, corpus["train"], config, method, callback=callback)
print(f"# done {time.time() - started:.0f}s peak {peak_memory_bytes() / 2**30:.2f} GiB", flush=True)
