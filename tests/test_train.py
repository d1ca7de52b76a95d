"""Training loop, config validation, determinism, checkpoint layout and resume (tiny CPU runs)."""

import json

import numpy as np
import pytest
import torch

from conftest import tiny_dataset
from diffrec_ext import checkpoint as ckpt
from diffrec_ext.data import training_sequences
from diffrec_ext.train import ConfigError, TrainConfig, _Replicas, _train_step, _TrainingLoss, build_model, train

TINY = dict(dim=16, layers=1, heads=2, max_len=8, num_steps=20, num_samples=2, batch_size=32, epochs=2,
            dropout=0.1, device="cpu")




@pytest.fixture(scope="module")
def dataset():
    return tiny_dataset()


def metrics_of(result):
    return {split: result[split] for split in ("valid", "test")}


@pytest.mark.parametrize("bad, message", [
    (dict(dim="64"), "dim must be int"),
    (dict(dim=30, heads=4), "divisible"),
    (dict(dropout=1.5), "dropout"),
    (dict(lr=0.0), "lr must be > 0"),
    (dict(mode="windows"), "mode must be one of"),
    (dict(kind="bert"), "kind must be one of"),
    (dict(schedule="exp"), "schedule must be one of"),
    (dict(num_steps=0), "num_steps must be >= 1"),
    (dict(noised_positions=9, max_len=8), "noised_positions must be <= 8"),
    (dict(mode="user", noised_positions=2), "noises the target only"),
    (dict(mode="user", causal=False), "needs causal"),
    (dict(epochs=True), "epochs must be int"),
    (dict(batch_size=-1), "batch_size must be >= 1"),
    (dict(device="tpu"), "device must be"),
    (dict(inference="ddim"), "inference must be one of"),
    (dict(input_scale=0.0), "input_scale must be > 0"),
    (dict(importance_loss="ce"), "importance_loss must be one of"),
    (dict(attn_dropout=1.0), "attn_dropout"),
    (dict(mode="window", samples_per_epoch=1000), "samples_per_epoch = 1000 draws prefixes: it needs mode 'prefix'"),
    (dict(bf16="yes"), "bf16 must be one of"),
    (dict(lr_schedule="step"), "lr_schedule must be one of"),
])
def test_malformed_config_values_get_clear_errors(bad, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**bad).validate()


def test_cosine_lr_anneals_per_batch_to_zero_at_the_last_epoch():
    config = TrainConfig(lr=0.01, epochs=4, lr_schedule="cosine")
    rates = [config.learning_rate(epoch, batch, 10) for epoch in range(1, 5) for batch in range(10)]
    assert rates[0] == 0.01
    assert rates[20] == pytest.approx(0.005)  # halfway: epoch 3, batch 0
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert 0 < rates[-1] < 1e-4
    assert config.replace(lr_schedule="constant").learning_rate(3, 7, 10) == 0.01


def test_training_steps_at_the_scheduled_lr(dataset, tmp_path):
    config = TrainConfig(**{**TINY, "lr_schedule": "cosine"})
    train(config, dataset, tmp_path / "run", progress=False, log=None)
    _, state, _ = ckpt.read_run_state(tmp_path / "run")
    rows = training_sequences(dataset, config.max_len, "window", config.resolved_window_stride)
    batches = -(-len(rows) // config.batch_size)
    last_lr = state["optimizer"]["param_groups"][0]["lr"]  # the lr of the last step taken
    assert last_lr == pytest.approx(config.learning_rate(config.epochs, batches - 1, batches), rel=1e-12)
    assert 0 < last_lr < config.lr / 2


def test_config_reads_the_old_name_of_num_samples():
    """Checkpoints and config files written before the rename hold "seeds"."""
    old = {**TrainConfig(**TINY).to_dict(), "seeds": 7}
    del old["num_samples"]
    assert TrainConfig.from_dict(old).num_samples == 7
    with pytest.raises(ConfigError, match=r"unknown config keys \['seeds'\]"):  # both spellings: not guessed
        TrainConfig.from_dict({**old, "num_samples": 3})


def test_config_dict_round_trip_and_unknown_keys():
    config = TrainConfig(**TINY)
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="unknown config keys"):
        TrainConfig.from_dict({**config.to_dict(), "hidden": 3})


def test_loss_stops_gradient_through_mse_target_and_uses_importance_weights(dataset):
    from diffrec_ext.data import training_sequences
    from diffrec_ext.sampler import LossSecondMomentSampler

    config = TrainConfig(**{**TINY, "dropout": 0.0}, mse_weight=1.0, mode="prefix")
    torch.manual_seed(0)
    model = build_model(config, dataset.num_items)
    rows = training_sequences(dataset, config.max_len - 1, "prefix")
    batch = rows.batch(np.arange(16))
    sampler = LossSecondMomentSampler(config.num_steps)
    gen = torch.Generator().manual_seed(0)
    loss, parts = _train_step(_TrainingLoss(model, config.two_stream), model, batch, config, sampler, gen,
                              torch.Generator().manual_seed(1), torch.device("cpu"), _Replicas())
    assert set(parts) == {"targets", "loss", "loss_rec", "loss_mse"} and parts["targets"] == 16
    assert parts["loss"] == pytest.approx(parts["loss_rec"] + parts["loss_mse"], rel=1e-5)
    assert int(sampler.counts.sum()) == 16  # one L_n recorded per sequence
    # the MSE alone gives the target's embedding row a gradient only through the noised input
    # (scaled by sqrt(abar_n)), never through the regression target
    model.zero_grad()
    target = int(batch["target"][0])
    ids = model.build_input(batch["history"][:1], batch["target"][:1])
    f = model(ids, torch.tensor([config.num_steps]), torch.zeros(1, 1, config.dim))
    mse = (f - model.item_vectors(batch["target"][:1]).detach()).pow(2).mean()
    mse.backward()
    grad_with_stop = model.item_emb.weight.grad[target].clone()
    model.zero_grad()
    f = model(ids, torch.tensor([config.num_steps]), torch.zeros(1, 1, config.dim))
    (f - model.item_vectors(batch["target"][:1])).pow(2).mean().backward()
    assert not torch.allclose(grad_with_stop, model.item_emb.weight.grad[target])


def test_window_mode_draws_a_step_per_target_and_feeds_the_sampler_per_position(dataset):
    from diffrec_ext.data import training_sequences
    from diffrec_ext.sampler import LossSecondMomentSampler

    config = TrainConfig(**{**TINY, "dropout": 0.0}, mode="window", window_stride=3)
    torch.manual_seed(0)
    model = build_model(config, dataset.num_items)
    assert model.step_embedding == "target"  # "auto" for a two-stream mode
    rows = training_sequences(dataset, config.max_len, "window", 3)
    batch = rows.batch(np.arange(20))
    targets = int(batch["supervised"].sum())
    sampler = LossSecondMomentSampler(config.num_steps)
    loss, parts = _train_step(_TrainingLoss(model, config.two_stream), model, batch, config, sampler,
                              torch.Generator().manual_seed(0), torch.Generator().manual_seed(1),
                              torch.device("cpu"), _Replicas())
    assert parts["targets"] == targets and int(sampler.counts.sum()) == targets  # one L_n per target
    assert torch.isfinite(loss)
    # the same draws give the same loss; the loss is the mean over targets of L_rec + L_n / (N p_n)
    again, _ = _train_step(_TrainingLoss(model, config.two_stream), model, batch, config,
                           LossSecondMomentSampler(config.num_steps), torch.Generator().manual_seed(0),
                           torch.Generator().manual_seed(1), torch.device("cpu"), _Replicas())
    assert float(again.detach()) == pytest.approx(float(loss.detach()), rel=1e-6)


@pytest.mark.parametrize("kind, mode", [("diffrec", "prefix"), ("sasrec", "prefix"), ("diffrec", "user"),
                                        ("sasrec", "user"), ("diffrec", "window"), ("sasrec", "window")])
def test_tiny_training_runs_and_is_repeatable(dataset, kind, mode):
    config = TrainConfig(**TINY, kind=kind, mode=mode)
    first = train(config, dataset, progress=False, log=None)
    second = train(config, dataset, progress=False, log=None)
    assert metrics_of(first) == metrics_of(second)
    for split in ("valid", "test"):
        assert set(first[split]) == {f"{m}@{k}" for k in (5, 10, 20) for m in ("HR", "NDCG")}
        assert all(0.0 <= v <= 1.0 for v in first[split].values())
    assert set(first["popularity"]) == {"valid", "test"}


def test_run_directory_layout_log_and_best_checkpoint(dataset, tmp_path):
    config = TrainConfig(**{**TINY, "epochs": 3})
    result = train(config, dataset, tmp_path / "run", progress=False, log=None)
    run = tmp_path / "run"
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    for record in lines:
        assert {"loss", "loss_mse", "loss_rec", "valid", "item_emb_norm", "seconds", "coverage",
                "targets_per_s"} <= set(record)
        assert record["item_emb_norm"] > 0
        assert record["coverage"] == 1.0 and record["targets_per_s"] > 0  # window mode: every target once
    best = max(lines, key=lambda r: r["valid"]["NDCG@10"])
    pointer = json.loads((run / "best.json").read_text())
    assert pointer["epoch"] == result["best_epoch"] == best["epoch"]
    assert json.loads((run / "result.json").read_text())["test"] == result["test"]
    # only the epochs a pointer names are kept; no temporary files are left behind
    kept = sorted(p.name for p in run.iterdir() if p.is_dir())
    assert kept == sorted({f"epoch-{best['epoch']:04d}", "epoch-0003"})
    assert not [p for p in run.rglob("*") if p.name.startswith(".")]
    # a second run into the same directory without resume is refused
    with pytest.raises(ConfigError, match="already holds a run"):
        train(config, dataset, run, progress=False, log=None)


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("kind", ["diffrec", "sasrec"])
def test_resume_gives_the_same_result_as_an_uninterrupted_run(dataset, tmp_path, kind):
    # cosine: the resumed run must continue the schedule where it stopped
    config = TrainConfig(**{**TINY, "epochs": 3, "kind": kind, "lr_schedule": "cosine"})
    straight = train(config, dataset, tmp_path / "straight", progress=False, log=None)

    def stop_after_two(record):
        if record["epoch"] == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(config, dataset, tmp_path / "resumed", progress=False, log=None, callback=stop_after_two)
    assert json.loads((tmp_path / "resumed" / "last.json").read_text())["epoch"] == 2
    resumed = train(config, dataset, tmp_path / "resumed", resume=True, progress=False, log=None)
    assert metrics_of(resumed) == metrics_of(straight)
    assert resumed["best_epoch"] == straight["best_epoch"]
    for name, tensor in straight["model"].state_dict().items():
        torch.testing.assert_close(resumed["model"].state_dict()[name], tensor, rtol=0, atol=0)
    log = (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in log] == [1, 2, 3]
    # a changed config cannot resume
    with pytest.raises(ConfigError, match="config differs"):
        train(config.replace(dim=32), dataset, tmp_path / "resumed", resume=True, progress=False, log=None)


def test_checkpoint_state_is_safetensors_and_json(dataset, tmp_path):
    config = TrainConfig(**{**TINY, "epochs": 1})
    train(config, dataset, tmp_path / "run", progress=False, log=None)
    directory, state, tensors = ckpt.read_run_state(tmp_path / "run")
    assert state["train_state"]["epoch"] == 1
    assert any(name.startswith("optimizer.") for name in tensors)
    assert {"rng.steps", "rng.noise", "sampler.loss_history", "sampler.counts"} <= set(tensors)
    model, loaded_config, items, meta = ckpt.load_model(tmp_path / "run")
    assert loaded_config == config and len(items) == dataset.num_items
    assert meta["dataset"]["num_items"] == dataset.num_items


def test_early_stopping(dataset):
    config = TrainConfig(**{**TINY, "epochs": 30, "patience": 1, "lr": 1e-6})
    result = train(config, dataset, progress=False, log=None)
    assert result["epochs_run"] < 30


def test_best_weights_are_kept_apart_from_the_training_weights():
    """On the CPU, .cpu() returned the live parameters: the 'best' weights kept training and the
    test metrics of result.json were those of the last epoch (issue 16: evaluate did not reproduce
    result.json)."""
    from diffrec_ext.train import _on_cpu

    weights = {"w": torch.zeros(3)}
    kept = _on_cpu(weights)
    weights["w"] += 1.0
    assert kept["w"].tolist() == [0.0, 0.0, 0.0]
