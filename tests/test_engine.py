"""Inference engines (diffrec_ext.engine) against the model's own scoring, a plain PyTorch reverse
loop, and each other; CUDA graph checks run only where CUDA is."""

import math
import sys

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from oracle import reference_recommend

from diffrec_ext import checkpoint as ckpt
from diffrec_ext import inference, ops
from diffrec_ext.engine import InferenceEngine, UnknownItemsError
from diffrec_ext.model import DSR
from diffrec_ext.recommender import Recommender
from diffrec_ext.train import TrainConfig, build_model

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))  # the eager baseline and the inference benchmark
from bench_inference import build_parser as bench_parser, run_benchmark, run_quality  # noqa: E402
from eager_engine import EagerEngine  # noqa: E402

TINY = dict(num_items=40, max_len=9, dim=16, layers=2, heads=2, dropout=0.0, num_steps=20)
HISTORIES = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [], [7], [3, 3, 9, 1, 2]]  # one longer than T - 1


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return DSR(**{**TINY, **overrides}).eval()


def model_ids(model, histories):
    return inference.inference_input(model, histories)


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    config = TrainConfig(dim=16, layers=2, heads=2, max_len=9, num_steps=20, dropout=0.0, num_samples=4)
    torch.manual_seed(3)
    model = build_model(config, 40)
    items = [f"item-{100 + i}" for i in range(40)]  # original ids differ from dense ids
    return ckpt.save_model(tmp_path_factory.mktemp("ckpt"), model, config.to_dict(), items)


# ------------------------------------------------------------------------------------------ equality
@pytest.mark.parametrize("overrides", [
    {}, {"noised_positions": 3}, {"add_step": False}, {"layers": 0}, {"input_scale": 0.5},
    {"causal": False}, {"kind": "sasrec"}, {"step_embedding": "target"}, {"step_embedding": "target", "causal": False},
    {"tie_output": True}, {"kind": "sasrec", "tie_output": True},
])
@pytest.mark.parametrize("engine_class", [InferenceEngine, EagerEngine])
def test_alg3_predictions_equal_the_model(engine_class, overrides):
    model = tiny_model(**overrides)
    engine = engine_class(model)
    if engine_class is InferenceEngine:
        assert engine.shares_history == model.causal
    seeds = 1 if model.kind == "sasrec" else 3
    noise = torch.randn(len(HISTORIES), seeds, model.noised_positions, model.dim)
    expected = inference.predict_h0(model, model_ids(model, HISTORIES), num_samples=seeds, noise=noise)
    ours = engine.predict_h0(HISTORIES, num_samples=seeds, algorithm="alg3", noise=noise)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_short_histories_are_trimmed_exactly():
    model = tiny_model()
    short = [[1, 2], [3], [4, 5, 6]]  # the batch is trimmed to 4 positions of T = 9
    engine = InferenceEngine(model)
    assert engine._batch_length(engine._dense_arrays(short)) == 4
    noise = torch.randn(3, 2, 1, model.dim)
    expected = inference.predict_h0(model, model_ids(model, short), num_samples=2, noise=noise)
    torch.testing.assert_close(engine.predict_h0(short, num_samples=2, algorithm="alg3", noise=noise), expected,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scoring", ["kernel", "user_chunks"])
@pytest.mark.parametrize("algorithm, stride", [("alg3", 1), ("alg2", 1), ("alg2", 6)])
@pytest.mark.parametrize("exclude_seen", [True, False])
def test_recommend_equals_the_model_scoring(scoring, algorithm, stride, exclude_seen):
    """Same noise stream (one generator per call, drawn batch after batch) and same batches: the
    engine returns the items and scores of the plain reference (float64 softmax over the catalog)."""
    model = tiny_model()
    engine = InferenceEngine(model, batch_size=2, sort_by_length=False, scoring=scoring,
                             scoring_memory_bytes=3 * 41 * 4)  # user chunks of one user
    expected_ids, expected_scores = reference_recommend(model, HISTORIES, k=7, exclude_seen=exclude_seen, num_samples=3,
                                                        algorithm=algorithm, stride=stride, seed=5, batch_size=2)
    ids, scores = engine.recommend_dense(HISTORIES, k=7, exclude_seen=exclude_seen, num_samples=3, algorithm=algorithm,
                                         stride=stride, seed=5)
    torch.testing.assert_close(scores, expected_scores, rtol=1e-5, atol=1e-7)
    assert torch.equal(ids, expected_ids)


def test_eager_engine_ranks_like_the_fused_engine():
    model = tiny_model()
    fused = InferenceEngine(model, batch_size=2, sort_by_length=False)
    eager = EagerEngine(model, batch_size=2)
    for algorithm in ("alg3", "alg2"):
        a = fused.recommend_dense(HISTORIES, k=5, num_samples=3, algorithm=algorithm, stride=4, seed=1)
        b = eager.recommend_dense(HISTORIES, k=5, num_samples=3, algorithm=algorithm, stride=4, seed=1)
        assert torch.equal(a[0], b[0])
        torch.testing.assert_close(a[1], b[1], rtol=1e-5, atol=1e-7)


def test_user_chunk_scoring_follows_the_kernel_contract():
    model = tiny_model()
    engine = InferenceEngine(model, scoring="user_chunks", scoring_memory_bytes=2 * 4 * 41 * 4)
    with torch.no_grad():
        model.out.bias[10:14] = 3.0  # equal scores: ties must go to the smaller id
        model.out.weight[10:14] = model.out.weight[10]
    hidden = torch.randn(5, 4, model.dim)
    offsets, excluded = ops.exclusion_csr([[0], [0, 11, 3], [0], [0, 1, 2, 10], [0]])
    weight, bias = model.out.weight.detach(), model.out.bias.detach()
    expected = ops.seed_topk(hidden, weight, bias, 12, offsets, excluded)
    ours = engine._score_user_chunks(hidden, weight, bias, 12, offsets, excluded)
    assert torch.equal(ours[1], expected[1])
    torch.testing.assert_close(ours[0], expected[0], rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------------------------ Alg. 2
def plain_reverse(model, histories, seeds, noise, visited):
    """Alg. 2 as a plain PyTorch loop over the model's pieces: no fused op, no engine code."""
    ids = model_ids(model, histories).repeat_interleave(seeds, 0)
    pad = ids == 0
    abar, b, n, d = model.schedule.abar, model.input_scale, model.num_steps, model.dim
    h = math.sqrt(abar[n]) * b * model.item_vectors(torch.tensor(model.unk_id)) + math.sqrt(1 - abar[n]) * noise[0]
    j = torch.arange(d) // 2
    freq = torch.exp(-math.log(10000.0) * (2.0 * j) / d)
    for i, t in enumerate(visited):
        emb = torch.cat([model.item_vectors(ids)[:, :-1], h[:, None]], 1)
        z = torch.where(torch.arange(d) % 2 == 0, torch.sin(t * freq), torch.cos(t * freq)).float()
        x = (emb + model.pos_emb * model.emb_scale + z).masked_fill(pad[:, :, None], 0.0)
        f = model.encode(model.input_ln(x), pad)[:, -1]
        if i + 1 == len(visited):
            return f
        s = visited[i + 1]
        beta = 1 - float(abar[t] / abar[s])
        c0 = math.sqrt(abar[s]) * beta / (1 - abar[t])
        cn = math.sqrt(1 - beta) * (1 - abar[s]) / (1 - abar[t])
        var = beta * (1 - abar[s]) / (1 - abar[t])
        h = float(c0) * b * f + float(cn) * h + math.sqrt(var) * noise[i + 1]


@pytest.mark.parametrize("stride, input_scale", [(1, 1.0), (3, 1.0), (20, 1.0), (1, 0.4)])
@pytest.mark.parametrize("engine_class", [InferenceEngine, EagerEngine])
def test_alg2_equals_a_plain_loop(engine_class, stride, input_scale):
    model = tiny_model(input_scale=input_scale)
    visited = list(range(model.num_steps, 0, -stride))
    noise = torch.randn(len(visited), len(HISTORIES), 3, model.dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = plain_reverse(model, HISTORIES, 3, noise.reshape(len(visited), -1, model.dim), visited)
    ours = engine_class(model).predict_h0(HISTORIES, num_samples=3, algorithm="alg2", stride=stride, noise=noise)
    torch.testing.assert_close(ours, plain.reshape(len(HISTORIES), 3, -1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stride", [1, 4])
@pytest.mark.parametrize("engine_class", [InferenceEngine, EagerEngine])
def test_alg2_with_the_step_embedding_on_the_target_equals_the_model(engine_class, stride):
    """A model trained with per-target steps (step_embedding "target"): the engine's reverse
    process, history computed once for every step, equals the model's own Alg. 2."""
    model = tiny_model(step_embedding="target", input_scale=0.5)
    visited = inference.reverse_steps(model.num_steps, stride)
    noise = torch.randn(len(visited), len(HISTORIES), 3, model.dim, generator=torch.Generator().manual_seed(4))
    expected = inference.predict_h0(model, model_ids(model, HISTORIES), num_samples=3, method="alg2", stride=stride,
                                    noise=noise)
    ours = engine_class(model).predict_h0(HISTORIES, num_samples=3, algorithm="alg2", stride=stride, noise=noise)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------ exclusion
@pytest.mark.parametrize("scoring", ["kernel", "user_chunks"])
@pytest.mark.parametrize("algorithm", ["alg3", "alg2"])
def test_exclude_seen_never_returns_a_seen_item(scoring, algorithm):
    model = tiny_model()
    with torch.no_grad():  # make padding and the seen items the most likely, to be sure they are removed
        model.out.bias[0] = 50.0
        model.out.bias[1:14] = 40.0
    engines = [InferenceEngine(model, batch_size=2, scoring=scoring), EagerEngine(model, batch_size=2)]
    for engine in engines:
        ids, scores = engine.recommend_dense(HISTORIES, k=20, num_samples=2, algorithm=algorithm, stride=5)
        for row, history in zip(ids.tolist(), HISTORIES):
            assert 0 not in row and not set(row) & set(history) and len(set(row)) == 20
        assert (scores[:, :-1] >= scores[:, 1:]).all()
        ids, _ = engine.recommend_dense(HISTORIES, k=5, exclude_seen=False, num_samples=2, algorithm=algorithm, stride=5)
        assert 0 not in ids.flatten().tolist() and set(ids.flatten().tolist()) <= set(range(1, 14))


# ------------------------------------------------------------------------------------------ batching, ids
def test_results_come_back_in_input_order_across_sorted_batches():
    model = tiny_model(kind="sasrec")  # deterministic: a user's result cannot depend on its batch
    rng = np.random.default_rng(0)
    histories = [rng.integers(1, 41, int(rng.integers(0, 12))).tolist() for _ in range(23)]
    engine = InferenceEngine(model, batch_size=4)
    ids, scores = engine.recommend_dense(histories, k=6)
    for row, history in enumerate(histories):
        one_ids, one_scores = engine.recommend_dense([history], k=6)
        assert torch.equal(ids[row], one_ids[0])
        torch.testing.assert_close(scores[row], one_scores[0])


def test_checkpoint_engine_speaks_original_ids(checkpoint_dir):
    engine = InferenceEngine.from_checkpoint(checkpoint_dir, device="cpu")
    assert engine.default_num_samples == 4 and engine.describe()["num_items"] == 40
    rec = Recommender.from_checkpoint(checkpoint_dir)
    history = ["item-103", "item-110", "item-111"]
    top = engine.recommend([history, []], k=5)
    assert len(top.items) == 2 and all(len(row) == 5 for row in top.items)
    assert not set(top.items[0]) & set(history)
    dense, unknown = rec.to_dense(history)
    assert not unknown
    ids, scores = reference_recommend(rec.model, [dense, []], k=5, num_samples=4)
    assert top.items == [[rec.item_ids[i - 1] for i in row] for row in ids.tolist()]
    torch.testing.assert_close(top.scores, scores, rtol=1e-5, atol=1e-7)
    with pytest.raises(UnknownItemsError, match="history 1: 1 unknown item id.*'nope'"):
        engine.recommend([history, ["item-100", "nope"]])


def test_seeds_is_a_deprecated_spelling_of_num_samples(checkpoint_dir):
    engine = InferenceEngine.from_checkpoint(checkpoint_dir, device="cpu")
    rec = Recommender.from_checkpoint(checkpoint_dir)
    histories = [[1, 2, 3], [4]]
    with pytest.warns(DeprecationWarning, match="'seeds' is deprecated, use 'num_samples'"):
        old = engine.recommend_dense(histories, k=5, seeds=2, seed=3)
    new = engine.recommend_dense(histories, k=5, num_samples=2, seed=3)
    assert torch.equal(old[0], new[0]) and torch.equal(old[1], new[1])
    assert not torch.equal(new[1], engine.recommend_dense(histories, k=5, num_samples=3, seed=3)[1])
    with pytest.warns(DeprecationWarning, match="'method' is deprecated, use 'algorithm'"):
        assert rec.recommend_dense(histories, k=5, method="alg3", num_samples=2, seed=3) == rec.recommend_dense(
            histories, k=5, algorithm="alg3", num_samples=2, seed=3)
    with pytest.raises(TypeError, match="both 'seeds' \\(deprecated\\) and 'num_samples'"):
        engine.target_ranks(histories, [5, 6], seeds=2, num_samples=2)


@pytest.mark.parametrize("call, message", [
    (dict(k=0), "k must be an int in"),
    (dict(k=41), "k must be an int in"),
    (dict(k=38), "exceeds the 37 items left"),
    (dict(num_samples=0), "num_samples must be a positive int"),
    (dict(algorithm="ddim"), "algorithm must be one of"),
    (dict(algorithm="alg2", stride=0), "stride must be an int"),
    (dict(histories=[[1, 41]]), r"histories\[0\]\[1\] = 41 is out of range: dense item ids lie in \[1, 40\]"),
    (dict(histories=[[1.5, 2]]), r"histories\[0\]\[0\] = 1.5 is not an item id"),
    (dict(histories=[["a", 2]]), r"histories\[0\]\[0\] = 'a' is not an integer item id"),
    (dict(histories=["12"]), r"histories\[0\] must be a list, .* got str '12'"),
])
def test_bad_requests_are_clear_errors(call, message):
    engine = InferenceEngine(tiny_model())
    call = {"histories": [[1, 2, 3]], **call}
    with pytest.raises(ValueError, match=message):
        engine.recommend_dense(**call)


def test_empty_call_and_bad_construction():
    model = tiny_model()
    ids, scores = InferenceEngine(model).recommend_dense([], k=3)
    assert ids.shape == (0, 3) and scores.shape == (0, 3)
    with pytest.raises(ValueError, match="share_history needs causal attention"):
        InferenceEngine(tiny_model(causal=False), share_history=True)
    with pytest.raises(ValueError, match="item ids for a model of 40"):
        InferenceEngine(model, item_ids=["a"])
    with pytest.raises(ValueError, match="scoring must be one of"):
        InferenceEngine(model, scoring="fast")
    with pytest.raises(ValueError, match="noise must have shape"):
        InferenceEngine(model).predict_h0([[1]], num_samples=2, algorithm="alg3", noise=torch.zeros(1, 3, 1, 16))


# ------------------------------------------------------------------------------------------ benchmark
def test_benchmark_writes_csv_table_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    rows = run_benchmark(steps=(1, 2, 8), catalog_sizes=(50,), batch_sizes=(2,), devices=("cpu",), out_dir=tmp_path,
                         engines=("eager", "fused", "fused_kernel", "fused_full"), seeds=3, dim=16, max_len=6,
                         num_steps=8, k=5, min_seconds=0.0, max_repeats=1, quiet=True)
    assert {(r["engine"], r["algorithm"], r["steps"]) for r in rows} == {
        (e, a, s) for e in ("eager", "fused", "fused_kernel", "fused_full")
        for a, s in (("alg3", 1), ("alg2", 1), ("alg2", 2), ("alg2", 8))}
    assert all(r["status"] == "ok" and r["users_per_s"] > 0 for r in rows)
    assert all(r["speedup_vs_eager"] == 1.0 for r in rows if r["engine"] == "eager")
    assert (tmp_path / "results.csv").read_text().count("\n") == len(rows) + 1
    assert "| cpu | fused | alg3 |" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "inference.png").read_bytes()[:4] == b"\x89PNG"


def test_benchmark_skips_what_exceeds_the_budget():
    rows = run_benchmark(steps=(1, 8), catalog_sizes=(50,), batch_sizes=(2,), engines=("eager",), seeds=2, dim=16,
                         max_len=6, num_steps=8, k=5, min_seconds=0.0, max_repeats=1, max_seconds=1e-9, quiet=True)
    by_steps = {r["steps"]: r for r in rows if r["algorithm"] == "alg2"}
    assert by_steps[1]["status"] == "ok" and by_steps[8]["status"].startswith("skipped: estimated")


def test_stride_quality_of_a_checkpoint(tmp_path):
    from diffrec_ext.synthetic import synthetic_dataset

    dataset = synthetic_dataset(num_users=40, num_items=30, num_clusters=3, min_length=5, max_length=9)
    config = TrainConfig(dim=16, layers=1, heads=2, max_len=9, num_steps=20, dropout=0.0, num_samples=2)
    torch.manual_seed(0)
    directory = ckpt.save_model(tmp_path / "ckpt", build_model(config, dataset.num_items), config.to_dict(),
                                list(range(dataset.num_items)), {"data": {"path": "synthetic", "k_core": 5}})
    rows = run_quality(directory, tmp_path, dataset=dataset, steps=(1, 4, 20), max_users=25, quiet=True)
    assert [(r["algorithm"], r["steps"], r["stride"]) for r in rows] == [
        ("alg3", 1, 1), ("alg2", 1, 20), ("alg2", 4, 5), ("alg2", 20, 1)]
    assert all(r["users"] == 25 and 0.0 <= r["NDCG@10"] <= r["HR@10"] <= 1.0 for r in rows)
    assert "| alg2 | 20 | 1 |" in (tmp_path / "quality.md").read_text()
    with pytest.raises(ValueError, match="the dataset has 797 items, the checkpoint 25"):
        run_quality(directory, data="synthetic", steps=(1,), quiet=True)


def test_benchmark_parser_has_help():
    parser = bench_parser()
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--help"])
    assert exit_info.value.code == 0
    args = parser.parse_args(["--device", "cpu", "--steps", "1 10", "--batch-sizes", "4"])
    assert args.steps == (1, 10) and args.batch_sizes == (4,)


# ------------------------------------------------------------------------------------------ CUDA
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("algorithm, stride", [("alg3", 1), ("alg2", 1), ("alg2", 7)])
def test_graph_captured_loop_equals_uncaptured(dtype, algorithm, stride):
    model = tiny_model(num_items=300, max_len=12, dim=32)
    histories = [[1, 2, 3], list(range(1, 30)), [], [7], [5, 6]]  # 5 users -> graph rows padded to 8
    captured = InferenceEngine(model, device="cuda", dtype=dtype, cuda_graphs=True, batch_size=8)
    eager = InferenceEngine(model, device="cuda", dtype=dtype, cuda_graphs=False, batch_size=8)
    steps = 1 if algorithm == "alg3" else len(range(model.num_steps, 0, -stride))
    shape = (len(histories), 3, 1, 32) if algorithm == "alg3" else (steps, len(histories), 3, 32)
    noise = torch.randn(shape)
    # the same kernels in the same order: equal up to a library picking another algorithm in capture
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for _ in range(2):  # the second call replays the captured graph
        a = captured.predict_h0(histories, num_samples=3, algorithm=algorithm, stride=stride, noise=noise)
        b = eager.predict_h0(histories, num_samples=3, algorithm=algorithm, stride=stride, noise=noise)
        torch.testing.assert_close(a, b, **tolerance)
        assert not torch.isnan(a).any()
    ranked_a = captured.recommend_dense(histories, k=10, num_samples=3, algorithm=algorithm, stride=stride, seed=4)
    ranked_b = eager.recommend_dense(histories, k=10, num_samples=3, algorithm=algorithm, stride=stride, seed=4)
    torch.testing.assert_close(ranked_a[1], ranked_b[1], **tolerance)
    if dtype == torch.float32:  # the CPU float32 engine computes the same thing
        cpu = InferenceEngine(model, device="cpu").predict_h0(histories, num_samples=3, algorithm=algorithm,
                                                              stride=stride, noise=noise)
        torch.testing.assert_close(a, cpu, rtol=1e-3, atol=1e-3)
    else:
        assert captured.model.out.weight.dtype == torch.bfloat16


@cuda
@pytest.mark.cuda
def test_cuda_engine_many_batches_and_exclusion():
    model = tiny_model(num_items=500, max_len=12, dim=32)
    rng = np.random.default_rng(1)
    histories = [rng.integers(1, 501, int(rng.integers(1, 20))).tolist() for _ in range(70)]
    engine = InferenceEngine(model, device="cuda", batch_size=16)
    ids, scores = engine.recommend_dense(histories, k=25, num_samples=4)
    reference_ids, _ = InferenceEngine(model, device="cuda", batch_size=16, cuda_graphs=False).recommend_dense(
        histories, k=25, num_samples=4)
    assert torch.equal(ids, reference_ids)
    for row, history in zip(ids.tolist(), histories):
        assert 0 not in row and not set(row) & set(history)
    assert torch.isfinite(scores).all()
