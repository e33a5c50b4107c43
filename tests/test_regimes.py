"""Training regimes (MeZO, HFT, surgical fine-tuning) on tiny random models and toy data built here."""

import copy

import pytest
import torch

from conftest import build_tiny_model, build_tokenizer
from deltatune.batching import collate
from deltatune.config import build_config
from deltatune.errors import DeltatuneError
from deltatune.methods import build_method, prepare_model
from deltatune.regime_runs import surgical_trainer
from deltatune.regimes import HalfFineTuning, step_seed
from deltatune.training import TrainConfig, Trainer, prepare_data, task_loss
from test_training import SENTIMENT, sentiment_splits


def _trainer(method_name="full", kind="bert", **settings):
    torch.manual_seed(0)
    model, tokenizer = build_tiny_model(kind), build_tokenizer()
    method = build_method(method_name)
    prepare_model(model, method)
    train_split, dev_split = sentiment_splits()
    config = TrainConfig(**{"batch_size": 16, "quiet": True, "seed": 3, "precision": "fp32", **settings})
    data = prepare_data(model, tokenizer, SENTIMENT, train_split, dev_split, None, config)
    return Trainer(model, method, SENTIMENT, data, config), data


def _batch_loss(model, data, indices):
    batch = collate(data.train, indices, data.pad_token_id, False)
    labels = batch.pop("labels")
    with torch.no_grad():
        return task_loss(model(**batch).logits, labels, False).item()


def test_mezo_step_is_the_papers_formula_from_the_same_seed():
    epsilon, rate, decay = 1e-2, 1e-2, 0.1
    trainer, data = _trainer(
        regime="mezo",
        mezo_epsilon=epsilon,
        learning_rate=rate,
        weight_decay=decay,
        schedule="constant",
        warmup_ratio=0.0,
    )
    reference = copy.deepcopy(trainer.model).eval()
    before = [p.detach().clone() for p in trainer.trainable]
    decays = [group["weight_decay"] for group in trainer.optimizer.param_groups for _ in group["params"]]
    trainer._step()
    indices = trainer.batches[0]  # the batch that step took
    generator = torch.Generator().manual_seed(step_seed(3, 0))
    directions = [torch.randn(p.shape, generator=generator) for p in before]
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    reference_parameters = dict(reference.named_parameters())

    def loss_at(sign):
        with torch.no_grad():
            for parameter, theta, z in zip(trainer.trainable, before, directions, strict=True):
                reference_parameters[names[id(parameter)]].copy_(theta + sign * epsilon * z)
        return _batch_loss(reference, data, indices)

    projected = (loss_at(1) - loss_at(-1)) / (2 * epsilon)
    assert trainer.zeroth_order.projected_gradient == pytest.approx(projected, rel=1e-3, abs=1e-5)
    assert abs(projected) > 1e-3  # the step moved something, so the comparison below means something
    for parameter, theta, z, weight_decay in zip(trainer.trainable, before, directions, decays, strict=True):
        expected = theta - rate * (projected * z + weight_decay * theta)
        torch.testing.assert_close(parameter.detach(), expected, rtol=1e-4, atol=1e-5)
    assert any(d > 0 for d in decays) and any(d == 0 for d in decays)


def test_mezo_never_runs_a_backward_pass_nor_allocates_a_gradient(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("backward called under MeZO")

    monkeypatch.setattr(torch.Tensor, "backward", refuse)
    monkeypatch.setattr(torch.autograd, "backward", refuse)
    trainer, _ = _trainer("lora", regime="mezo", max_steps=6, learning_rate=1e-3)
    seen = []
    for _ in range(6):
        trainer._step()
        seen += [p.grad is not None for p in trainer.model.parameters()]
    assert not any(seen) and trainer.step == 6
    assert not trainer.optimizer.state  # no optimizer state: no momentum, no Adam moments
    with pytest.raises(AssertionError, match="backward called"):  # the standard loop would have
        _trainer("lora", max_steps=1)[0]._step()


def test_mezo_takes_its_own_learning_rates_not_adamws():
    from deltatune.search import learning_rate_candidates

    search = TrainConfig(regime="mezo", lr_search="auto")
    assert learning_rate_candidates(search, build_method("full")) == (1e-7, 1e-6, 1e-5)  # the paper's grid
    assert learning_rate_candidates(search, build_method("lora")) == (1e-5, 5e-5, 1e-4)
    bitfit = build_method("bitfit")  # not tuned in the paper: its AdamW candidates scaled by 1/100
    assert learning_rate_candidates(search, bitfit) == tuple(
        float(f"{rate / 100:.3g}") for rate in bitfit.learning_rate_candidates
    )
    assert learning_rate_candidates(TrainConfig(lr_search="auto"), bitfit) == bitfit.learning_rate_candidates
    assert learning_rate_candidates(TrainConfig(regime="mezo", lr_search=(0.5,)), bitfit) == (0.5,)  # asked for
    trainer, _ = _trainer("lora", regime="mezo", max_steps=1)
    assert trainer.learning_rate == 5e-5  # the middle of LoRA's MeZO grid, not AdamW's default
    assert _trainer("lora", max_steps=1)[0].learning_rate == build_method("lora").default_learning_rate
    assert _trainer("lora", regime="mezo", max_steps=1, learning_rate=3e-3)[0].learning_rate == 3e-3


def test_mezo_lowers_the_training_loss_on_a_learnable_task():
    from transformers import AutoModelForSequenceClassification

    from conftest import tiny_bert_config

    # the default tiny model starts with near-constant logits, whose loss differences at epsilon are rounding;
    # a wider initialisation gives MeZO's SGD a slope to follow
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(tiny_bert_config(2, initializer_range=0.2))
    method = build_method("lora")
    prepare_model(model, method)
    train_split, dev_split = sentiment_splits()
    config = TrainConfig(
        batch_size=16,
        quiet=True,
        seed=3,
        precision="fp32",
        regime="mezo",
        mezo_epsilon=1e-2,
        max_steps=100,
        learning_rate=1e-2,
        schedule="constant",
        warmup_ratio=0.0,
        weight_decay=0.0,
    )
    data = prepare_data(model, build_tokenizer(), SENTIMENT, train_split, dev_split, None, config)
    trainer = Trainer(model, method, SENTIMENT, data, config)
    everything = list(range(len(data.train)))
    start = _batch_loss(model.eval(), data, everything)
    for _ in range(100):
        trainer._step()
    end = _batch_loss(model.eval(), data, everything)
    assert end < start - 0.01, (start, end)


def test_hft_freezes_exactly_half_per_stage_and_draws_again():
    model = build_tiny_model("bert")
    prepare_model(model, build_method("full"))
    named = dict(model.named_parameters())
    hook = HalfFineTuning(model, every=4, seed=1)
    sizes = {position: len(parameters) for position, parameters in hook.by_position.items()}
    frozen = {n for n, p in named.items() if not p.requires_grad}
    assert len(frozen) == sum(size // 2 for size in sizes.values()) > 0
    assert named["classifier.weight"].requires_grad  # the head always trains
    hook.update(3)  # same stage: nothing changes
    assert {n for n, p in named.items() if not p.requires_grad} == frozen
    hook.update(4)
    redrawn = {n for n, p in named.items() if not p.requires_grad}
    assert len(redrawn) == len(frozen) and redrawn != frozen
    hook.finish()
    assert all(p.requires_grad for p in model.parameters())


def test_hft_in_the_loop_leaves_the_frozen_half_untouched_and_still_learns():
    trainer, _ = _trainer(regime="hft", hft_stage_steps=2, learning_rate=3e-3, epochs=6)
    frozen = [p for p in trainer.model.parameters() if not p.requires_grad]
    before = [p.detach().clone() for p in frozen]
    trainer._step()
    assert frozen and all(torch.equal(p, b) for p, b in zip(frozen, before, strict=True))
    assert trainer.regime_report == {"regime": "hft", "stage_steps": 2}
    trainer.advance()
    result = trainer.finish()
    assert result.best_metrics["accuracy"] >= 0.8
    assert all(p.requires_grad for p in trainer.model.parameters())


def test_surgical_trains_only_the_block_its_probe_chose():
    torch.manual_seed(0)
    model, tokenizer = build_tiny_model("bert"), build_tokenizer()
    method = build_method("full")
    prepare_model(model, method)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_split, dev_split = sentiment_splits()
    config = TrainConfig(
        batch_size=16,
        quiet=True,
        seed=3,
        learning_rate=3e-3,
        epochs=3,
        regime="surgical",
        surgical_probe_steps=3,
        precision="fp32",
    )
    data = prepare_data(model, tokenizer, SENTIMENT, train_split, dev_split, None, config)
    trainer = surgical_trainer(model, method, SENTIMENT, data, config)
    report = trainer.regime_report
    assert set(report["probe_dev_scores"]) == {"embeddings", "layer 0", "layer 1", "top"}
    assert report["chosen_block"] == max(report["probe_dev_scores"], key=report["probe_dev_scores"].get)
    # the probes left the model at its start
    assert all(torch.equal(p, start[n]) for n, p in model.named_parameters())
    trainer.advance()
    trainer.finish()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, start[n])}
    assert changed and changed <= set(report["trained_names"])
    assert {n for n in report["trained_names"] if not n.startswith("classifier")} <= changed | {
        n for n in report["trained_names"] if "position_ids" in n
    }


def test_regime_settings_that_make_no_sense_are_refused_with_the_fix():
    with pytest.raises(DeltatuneError, match="nothing to checkpoint"):
        TrainConfig(regime="mezo", gradient_checkpointing=True)
    with pytest.raises(DeltatuneError, match="gradual_unfreezing"):
        TrainConfig(regime="hft", gradual_unfreezing=True)
    with pytest.raises(DeltatuneError, match="lr_search"):
        TrainConfig(regime="surgical", lr_search="auto")
    with pytest.raises(DeltatuneError, match="regime='mezzo'"):
        build_config(TrainConfig, {"regime": "mezzo"}, prefix="--")
    with pytest.raises(DeltatuneError, match="mezo_epsilon"):
        build_config(TrainConfig, {"mezo_epsilon": "0"}, prefix="--")
    assert build_config(TrainConfig, {"regime": "mezo", "mezo_epsilon": "0.01"}).mezo_epsilon == 0.01


def test_promot_stage_two_trains_the_model_with_the_stage_one_prompt_frozen_and_saves_both():
    from deltatune.methods import delta_state
    from deltatune.methods.promot import prompt_dropped
    from deltatune.regime_runs import promot_trainer

    torch.manual_seed(0)
    model, tokenizer = build_tiny_model("llama"), build_tokenizer()
    method = build_method(
        "promot", {"init": "vocab", "num_virtual_tokens": 4, "prompt_steps": 6, "prompt_learning_rate": 3e-2}
    )
    prepare_model(model, method, tokenizer)
    train_split, dev_split = sentiment_splits()
    config = TrainConfig(
        batch_size=16,
        quiet=True,
        seed=3,
        learning_rate=3e-3,
        max_steps=8,
        eval_every=4,
        regime="promot",
        precision="fp32",
    )
    data = prepare_data(model, tokenizer, SENTIMENT, train_split, dev_split, None, config)
    prompt_name = next(n for n in method.trainable_names(model) if "soft_prompt" in n)
    parameters = dict(model.named_parameters())
    initial_prompt = parameters[prompt_name].detach().clone()
    weight = "model.layers.0.mlp.down_proj.weight"
    initial_weight = parameters[weight].detach().clone()
    trainer = promot_trainer(model, method, SENTIMENT, data, config)
    stage_one_prompt = parameters[prompt_name].detach().clone()
    assert not torch.equal(stage_one_prompt, initial_prompt)  # stage 1 trained the prompt
    assert torch.equal(parameters[weight], initial_weight)  # ... and nothing of the model
    assert trainer.regime_report["stage1"]["steps"] == 6
    trainer.advance()
    trainer.finish()
    assert torch.equal(parameters[prompt_name], stage_one_prompt)  # frozen through stage 2
    assert not torch.equal(parameters[weight], initial_weight)  # stage 2 tuned the model
    saved = delta_state(model, method)
    assert any(torch.equal(tensor, stage_one_prompt) for tensor in saved.values())
    assert any(torch.equal(tensor, parameters[weight]) for tensor in saved.values())
    batch = collate(data.dev, [0, 1], data.pad_token_id, False)
    batch.pop("labels")
    with torch.no_grad():
        with_prompt = model.eval()(**batch).logits
        with prompt_dropped(model):
            without = model(**batch).logits
    assert not torch.allclose(with_prompt, without)  # the prompt can be dropped at inference
    assert torch.equal(model(**batch).logits, with_prompt)  # and comes back after


def test_promot_method_and_regime_go_together():
    from deltatune.regimes import check_regime_method

    with pytest.raises(DeltatuneError, match="regime=promot needs method promot"):
        check_regime_method(build_method("lora"), TrainConfig(regime="promot"))
    with pytest.raises(DeltatuneError, match="add --regime promot"):
        check_regime_method(build_method("promot"), TrainConfig())
    with pytest.raises(DeltatuneError, match="model_method"):
        build_method("promot", {"model_method": "lora"})


def test_the_cli_trains_with_a_regime_and_records_it(tmp_path, capsys):
    import json

    from conftest import save_tiny_model_dir, write_sentiment_csv
    from deltatune.cli import main

    model_dir = save_tiny_model_dir(tmp_path / "tiny-bert", "bert")
    data = write_sentiment_csv(tmp_path / "toy.csv", 96)
    common = [
        "train",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--text-fields",
        "text",
        "--quiet",
        "--max-steps",
        "4",
        "--batch-size",
        "16",
    ]
    assert (
        main(
            [
                *common,
                "--method",
                "full",
                "--regime",
                "surgical",
                "--surgical-probe-steps",
                "2",
                "--out",
                str(tmp_path / "surgical"),
            ]
        )
        == 0
    )
    record = json.loads((tmp_path / "surgical" / "run.json").read_text())
    assert record["regime_report"]["chosen_block"] in record["regime_report"]["probe_dev_scores"]
    assert record["train_config"]["regime"] == "surgical"
    assert 0 < record["trainable_params"] < record["total_params"]  # one block and the head, not the whole model
    assert main([*common, "--method", "lora", "--regime", "mezo", "--out", str(tmp_path / "mezo")]) == 0
    assert json.loads((tmp_path / "mezo" / "run.json").read_text())["regime_report"]["backward_passes"] == 0
    capsys.readouterr()
    assert (
        main(
            [
                *common,
                "--method",
                "lora",
                "--regime",
                "mezo",
                "--gradient-checkpointing",
                "--out",
                str(tmp_path / "bad"),
            ]
        )
        == 2
    )
    assert "nothing to checkpoint" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_a_compare_spec_takes_a_regime_and_old_grids_keep_their_identity():
    from deltatune.compare.spec import train_config_for
    from deltatune.compare.spec_checks import _check_train

    problems: list[str] = []
    mezo = _check_train({"epochs": 1, "regime": "mezo", "mezo_epsilon": 0.01}, "", problems)
    default = _check_train({"epochs": 1}, "", problems)
    assert not problems
    assert mezo["regime"] == "mezo" and "regime" not in default and "mezo_epsilon" not in default
    assert train_config_for({"train": mezo, "data_fraction": 1.0, "seed": 1, "time_budget_s": None}).regime == "mezo"
    _check_train({"regime": "hft", "gradual_unfreezing": True}, "", problems)
    assert problems and "gradual_unfreezing" in problems[0]
