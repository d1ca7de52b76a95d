"""Data-parallel training across 2 processes (torchrun, Gloo) against one process.

One torchrun launch runs `_worker_main` of this file in 2 processes: every run of RUNS trains
there with the same config, each rank saves what it holds at the end, and the tests compare the
ranks with each other and with `train()` of the same config in this process (no process group,
the whole combined batch in one process). Dropout is off so that the two are the same
computation up to float rounding (dropout masks are drawn per rank).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import capture_error, run_torchrun, tiny_dataset

from diffrec_ext import checkpoint as ckpt
from diffrec_ext import ops
from diffrec_ext.data import evaluation_batch
from diffrec_ext.inference import inference_input, predict_h0
from diffrec_ext.train import ConfigError, TrainConfig, build_model, evaluate, train

pytestmark = pytest.mark.skipif(
    not (ops.HAVE_EXTENSION and torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs the compiled extension and torch.distributed with Gloo",
)

WORLD_SIZE = 2
BASE = dict(dim=16, layers=1, heads=2, max_len=8, num_steps=10, num_samples=2, batch_size=16, epochs=2, dropout=0.0,
            eval_batch_size=16, device="cpu", bf16="off")  # float32: bf16 rounding differs with the batch split
# tiny_dataset: 180 prefix rows (12 combined batches, the last of 4 rows), 50 windows of stride 3 (4
# batches, the last of 2; a step drawn per window position); 50 evaluation users in batches of 16
# (rank 0 ranks batches 0 and 2, rank 1 1 and 3).
# num_steps = 10: the prefix run's importance sampler gets warm (10 losses per step) within its 360 sequences.
RUNS = {
    "prefix": TrainConfig(**BASE, mode="prefix", grad_clip=1.0),
    "window": TrainConfig(**BASE, mode="window", window_stride=3, importance_loss="total"),
    "sasrec": TrainConfig(**{**BASE, "epochs": 1}, kind="sasrec"),
}
# Weights after up to 24 Adam steps: float rounding of sums taken in another order; observed
# differences are <= 4e-6. One exception: the attention's key bias, whose exact gradient is zero
# (adding a constant to every key's logit leaves the softmax unchanged), so its gradients are
# rounding noise that Adam normalises into steps of ~lr with arbitrary signs, in both runs.
ATOL, RTOL = 2e-5, 1e-4


def comparable(weights: dict, dim: int) -> dict:
    """The weights without the key bias (rows [d, 2d) of each layer's qkv bias)."""
    return {key: torch.cat([value[:dim], value[2 * dim:]]) if key.endswith("qkv.bias") else value
            for key, value in weights.items()}


# ----------------------------------------------------------------------------- worker (torchrun)


def _worker_main() -> None:
    from diffrec_ext import distributed as dd

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    out = Path(parser.parse_args().out)
    torch.set_num_threads(1)
    context = dd.init_process_group_from_env()
    dataset = tiny_dataset()
    results = {"context": (context.rank, context.world_size, context.backend)}
    for name, config in RUNS.items():
        result = train(config, dataset, out / name, progress=False, log=None)
        results[name] = {"weights": result["model"].state_dict(), "valid": result["valid"], "test": result["test"],
                         "processes": result["processes"]}
    # Interrupted after epoch 1, then resumed: only rank 0 reads the checkpoint.
    train(RUNS["prefix"].replace(epochs=1), dataset, out / "resumed", progress=False, log=None)
    if context.rank == 0:  # kept for a test that resumes it in one process
        shutil.copytree(out / "resumed", out / "epoch1")
    resumed = train(RUNS["prefix"], dataset, out / "resumed", resume=True, progress=False, log=None)
    results["resumed"] = {"weights": resumed["model"].state_dict(), "test": resumed["test"]}
    results["errors"] = {
        "batch_not_divisible": capture_error(lambda: train(RUNS["prefix"].replace(batch_size=15), dataset,
                                                      progress=False, log=None)),
        # seen by rank 0 only (it alone looks at the run directory), raised on both
        "directory_holds_a_run": capture_error(lambda: train(RUNS["prefix"], dataset, out / "prefix", progress=False,
                                                        log=None)),
    }
    torch.save(results, out / f"rank{context.rank}.pt")
    dd.exit_without_teardown(0)


# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def dataset():
    return tiny_dataset()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("data_parallel")
    run_torchrun([Path(__file__).resolve(), "--out", out], WORLD_SIZE, timeout=600)
    return out, [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]


@pytest.fixture(scope="module")
def one_process(dataset, tmp_path_factory, one_torch_thread):
    out = tmp_path_factory.mktemp("single")
    return out, {name: train(config, dataset, out / name, progress=False, log=None) for name, config in RUNS.items()}


def test_workers_ran_on_gloo(two_processes):
    _, ranks = two_processes
    assert [r["context"] for r in ranks] == [(0, 2, "gloo"), (1, 2, "gloo")]
    assert all(r["prefix"]["processes"] == 2 for r in ranks)


@pytest.mark.parametrize("name", list(RUNS))
def test_ranks_end_with_identical_weights_and_metrics(two_processes, name):
    _, (first, second) = two_processes
    for key, tensor in first[name]["weights"].items():
        assert torch.equal(tensor, second[name]["weights"][key]), key
    assert first[name]["valid"] == second[name]["valid"] and first[name]["test"] == second[name]["test"]


@pytest.mark.parametrize("name", list(RUNS))
def test_two_processes_train_the_weights_of_one_process_on_the_combined_batch(two_processes, one_process, dataset,
                                                                             name):
    _, (first, _) = two_processes
    _, single = one_process
    dim = RUNS[name].dim
    want = comparable(single[name]["model"].state_dict(), dim)
    for key, tensor in comparable(first[name]["weights"], dim).items():
        torch.testing.assert_close(tensor, want[key], atol=ATOL, rtol=RTOL, msg=lambda m: f"{name} {key}: {m}")
    # the tolerance is far below what training moved: the comparison is not between untrained models
    torch.manual_seed(RUNS[name].seed)
    initial = comparable(build_model(RUNS[name], dataset.num_items).state_dict(), dim)
    moved = max(float((want[key] - initial[key]).abs().max()) for key in want)
    assert moved > 100 * ATOL


@pytest.mark.parametrize("name", list(RUNS))
def test_the_key_bias_difference_does_not_reach_the_predictions(two_processes, one_process, dataset, name):
    _, (first, _) = two_processes
    _, single = one_process
    two = build_model(RUNS[name], dataset.num_items)
    two.load_state_dict(first[name]["weights"])
    one = single[name]["model"]
    batch = evaluation_batch(dataset, "test", RUNS[name].max_len - 1)
    ids = inference_input(one, torch.from_numpy(batch.histories))
    noise = torch.randn(ids.shape[0], 2, 1, RUNS[name].dim, generator=torch.Generator().manual_seed(0))
    predictions = [predict_h0(model.eval(), ids, num_samples=2, noise=noise) for model in (two, one)]
    torch.testing.assert_close(*predictions, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(RUNS))
def test_metrics_of_both_runs_agree(two_processes, one_process, name):
    _, (first, _) = two_processes
    _, single = one_process
    for split in ("valid", "test"):
        for metric, value in first[name][split].items():
            assert value == pytest.approx(single[name][split][metric], abs=0.01), (split, metric)


def test_samplers_saw_every_ranks_losses_in_the_combined_order(two_processes, one_process):
    out_two, _ = two_processes
    out_one, _ = one_process
    for name in ("prefix", "window"):
        _, _, two = ckpt.read_run_state(out_two / name)
        _, _, one = ckpt.read_run_state(out_one / name)
        assert torch.equal(two["sampler.counts"], one["sampler.counts"])
        if name == "prefix":  # 360 sequences: warm, every step holds 10 losses and p_n is learnt
            assert int(two["sampler.counts"].sum()) == 10 * 10
        torch.testing.assert_close(two["sampler.loss_history"], one["sampler.loss_history"], atol=1e-4, rtol=1e-4)
        assert torch.equal(two["rng.steps"], one["rng.steps"])  # the same number of step draws


def test_checkpoint_of_two_processes_loads_in_one_process(two_processes, dataset):
    out, (first, _) = two_processes
    config = RUNS["prefix"]
    model, loaded_config, items, _ = ckpt.load_model(out / "prefix")
    assert loaded_config == config and len(items) == dataset.num_items
    for key, tensor in model.state_dict().items():  # the best epoch's weights, which were tested
        assert torch.equal(tensor, first["prefix"]["weights"][key]), key
    # one process ranks the test users exactly as the two processes did, sharded over users
    metrics = evaluate(model, dataset, "test", num_samples=config.num_samples, seed=config.seed, batch_size=config.eval_batch_size)
    assert metrics == first["prefix"]["test"]


def test_rank_zero_alone_writes_the_run(two_processes):
    out, _ = two_processes
    for name, config in RUNS.items():
        log = (out / name / "log.jsonl").read_text().splitlines()
        assert [json.loads(line)["epoch"] for line in log] == list(range(1, config.epochs + 1))
        assert json.loads((out / name / "result.json").read_text())["processes"] == WORLD_SIZE


def test_resumed_two_process_run_equals_the_uninterrupted_one(two_processes):
    _, ranks = two_processes
    for results in ranks:
        for key, tensor in results["prefix"]["weights"].items():
            assert torch.equal(results["resumed"]["weights"][key], tensor), key
        assert results["resumed"]["test"] == results["prefix"]["test"]


def test_two_process_run_resumes_in_one_process(two_processes, one_process, dataset, tmp_path):
    out, _ = two_processes
    _, single = one_process
    shutil.copytree(out / "epoch1", tmp_path / "run")
    resumed = train(RUNS["prefix"], dataset, tmp_path / "run", resume=True, progress=False, log=None)
    dim = RUNS["prefix"].dim
    want = comparable(single["prefix"]["model"].state_dict(), dim)
    for key, tensor in comparable(resumed["model"].state_dict(), dim).items():
        torch.testing.assert_close(tensor, want[key], atol=ATOL, rtol=RTOL, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("name,message", [
    ("batch_not_divisible", "batch_size = 15 .* must be divisible by the 2 processes"),
    ("directory_holds_a_run", "already holds a run"),
])
def test_bad_runs_raise_on_every_rank(two_processes, name, message):
    import re

    _, ranks = two_processes
    for rank, results in enumerate(ranks):
        kind, text = results["errors"][name]
        assert kind == ConfigError.__name__ and re.search(message, text), f"rank {rank}: {kind}: {text}"


def test_cli_train_under_torchrun(tmp_path):
    from diffrec_ext.synthetic import write_synthetic

    data = tmp_path / "tiny.txt"
    write_synthetic(data, num_users=40, num_items=30, num_clusters=3, min_length=6, max_length=10)
    run = run_torchrun(["-m", "diffrec_ext", "train", "--data", data, "--out", tmp_path / "run", "--k-core", "2",
                        "--dim", "16", "--layers", "1", "--max-len", "8", "--num-steps", "10", "--epochs", "1",
                        "--batch-size", "32", "--quiet"], WORLD_SIZE)
    assert run.stdout.count("test split") == 1  # rank 0 alone prints
    assert "2 processes of 16 rows per batch" in run.stdout
    assert json.loads((tmp_path / "run" / "result.json").read_text())["processes"] == WORLD_SIZE
    model, _, _, _ = ckpt.load_model(tmp_path / "run")
    assert model.num_items > 0


if __name__ == "__main__":
    _worker_main()
