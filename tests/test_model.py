"""Model, sampler, metrics, inference and checkpoint tests (CPU, small sizes, fast)."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_dataset

from diffrec_ext import checkpoint as ckpt
from diffrec_ext import ops
from diffrec_ext.data import popularity_ranking_metrics
from diffrec_ext.engine import InferenceEngine
from diffrec_ext.inference import posterior, predict_h0, reverse_steps
from diffrec_ext.metrics import hit_ratio, item_counts, ndcg, popularity_ranks, ranking_metrics
from diffrec_ext.model import DSR, attention_mask
from diffrec_ext.recommender import Recommender
from diffrec_ext.sampler import LossSecondMomentSampler
from diffrec_ext.train import TrainConfig, build_model, popularity_metrics


def tiny_model(kind="diffrec", seed=0, **overrides):
    torch.manual_seed(seed)
    options = dict(num_items=30, max_len=8, dim=16, layers=2, heads=2, dropout=0.0, num_steps=20, kind=kind)
    options.update(overrides)
    return DSR(**options).eval()


# ------------------------------------------------------------------------------------------ metrics
def test_metrics_hand_computed():
    ranks = np.array([0, 1, 4, 9, 25])
    assert hit_ratio(ranks, 5) == pytest.approx(3 / 5)
    assert hit_ratio(ranks, 10) == pytest.approx(4 / 5)
    assert hit_ratio(ranks, 20) == pytest.approx(4 / 5)
    assert ndcg(ranks, 5) == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6)) / 5)
    assert ndcg(ranks, 10) == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6) + 1 / math.log2(11)) / 5)
    metrics = ranking_metrics(torch.tensor(ranks))
    assert set(metrics) == {f"{m}@{k}" for k in (5, 10, 20) for m in ("HR", "NDCG")}
    assert metrics["NDCG@20"] == pytest.approx(ndcg(ranks, 10))
    with pytest.raises(ValueError):
        ranking_metrics(np.array([-1, 2]))


def test_popularity_ranks_pessimistic_ties_and_exclusion():
    counts = np.array([0, 5, 3, 3, 1])  # padding, items 1..4
    targets = np.array([2, 1, 4, 3])
    assert popularity_ranks(counts, targets).tolist() == [2, 0, 3, 2]
    # user 0 excludes item 1 (and, twice, itself: the target is never removed); user 2 excludes 0
    offsets = np.array([0, 3, 3, 4, 4])
    ids = np.array([1, 2, 2, 0])
    assert popularity_ranks(counts, targets, offsets, ids).tolist() == [1, 0, 3, 2]
    assert item_counts([[1, 2, 0], [2, 3]], 5).tolist() == [0, 1, 2, 1, 0]


@pytest.mark.parametrize("exclude_seen", [False, True])
def test_popularity_metrics_match_data_module(exclude_seen):
    dataset = tiny_dataset(users=60, items=25, longest=11)
    for split in ("valid", "test"):
        ours = popularity_metrics(dataset, split, exclude_seen)
        theirs = popularity_ranking_metrics(dataset, split, exclude_seen=exclude_seen)
        for key, value in theirs.items():
            assert ours[key] == pytest.approx(value)


# ------------------------------------------------------------------------------------------ sampler
def test_sampler_uniform_warmup_then_second_moment():
    sampler = LossSecondMomentSampler(num_steps=3, history=2, uniform_prob=0.001)
    np.testing.assert_allclose(sampler.probabilities(), [1 / 3] * 3)
    sampler.update([1, 1, 2, 2, 3], [1.0, 3.0, 2.0, 2.0, 9.0])
    assert not sampler.warmed_up()  # step 3 has one value of two
    np.testing.assert_allclose(sampler.probabilities(), [1 / 3] * 3)
    sampler.update(torch.tensor([3, 1]), torch.tensor([5.0, 4.0]))  # step 1: 1.0 dropped -> [3, 4]
    assert sampler.warmed_up()
    np.testing.assert_allclose(sampler.loss_history, [[3, 4], [2, 2], [9, 5]])
    weights = np.sqrt([(9 + 16) / 2, (4 + 4) / 2, (81 + 25) / 2])
    expected = weights / weights.sum() * (1 - 0.001) + 0.001 / 3
    np.testing.assert_allclose(sampler.probabilities(), expected, rtol=1e-12)
    steps, probs = sampler.sample(1000, torch.Generator().manual_seed(0))
    assert steps.min() >= 1 and steps.max() <= 3
    np.testing.assert_allclose(probs.numpy(), expected[steps.numpy() - 1])
    counts = np.bincount(steps.numpy(), minlength=4)[1:] / 1000
    np.testing.assert_allclose(counts, expected, atol=0.05)
    restored = LossSecondMomentSampler(3, 2)
    restored.load_state_dict(sampler.state_dict())
    np.testing.assert_array_equal(restored.probabilities(), sampler.probabilities())
    with pytest.raises(ValueError):
        sampler.update([0], [1.0])


# ------------------------------------------------------------------------------------------ model
@pytest.mark.parametrize("kind", ["diffrec", "sasrec"])
def test_forward_shapes_and_padding_invariance(kind):
    model = tiny_model(kind)
    history = torch.tensor([[0, 0, 0, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6, 7]])
    ids = model.build_input(history, torch.tensor([9, 8]) if kind == "diffrec" else None)
    assert ids.shape == (2, 8) and ids[1, -1] == (8 if kind == "diffrec" else model.unk_id)
    noise = torch.randn(2, model.noised_positions, 16)
    out = model(ids, torch.tensor([5, 20]), noise if kind == "diffrec" else None)
    assert out.shape == (2, 16) and torch.isfinite(out).all()
    # garbage ids under the padding mask change nothing
    garbage = ids.clone()
    garbage[0, :3] = torch.tensor([11, 12, 13])
    again = model(garbage, torch.tensor([5, 20]), noise if kind == "diffrec" else None, padding_mask=ids == 0)
    torch.testing.assert_close(again, out, rtol=0, atol=0)
    # the padded row alone gives the same output as inside the batch
    alone = model(ids[:1], torch.tensor([5]), noise[:1] if kind == "diffrec" else None)
    torch.testing.assert_close(alone, out[:1], rtol=1e-5, atol=1e-6)
    # a history shorter than T - 1 is left padded by build_input
    short = model.build_input(torch.tensor([[4, 5, 6, 7]]), torch.tensor([9]) if kind == "diffrec" else None)
    torch.testing.assert_close(short, ids[:1])


def test_bidirectional_mask_and_causal_mask():
    pad = torch.tensor([[True, False, False]])
    causal = attention_mask(pad, True)[0, 0]
    assert causal.tolist() == [[True, False, False], [False, True, False], [False, True, True]]
    full = attention_mask(pad, False)[0, 0]
    assert full.tolist() == [[True, True, True], [False, True, True], [False, True, True]]


@pytest.mark.parametrize("tie_output", [False, True])
@pytest.mark.parametrize("kind", ["diffrec", "sasrec"])
def test_two_stream_equals_prefix_pass_at_last_position(kind, tie_output):
    """The two-stream pass's last row is the prefix pass [w_0 .. w_{T-2}, slot] of the paper's
    construction, at the same step, in float64."""
    model = tiny_model(kind, step_embedding="target", tie_output=tie_output).double()
    windows = torch.tensor([[0, 0, 3, 5, 7, 9, 11, 13], [1, 2, 3, 4, 5, 6, 7, 8], [0, 0, 0, 0, 0, 0, 2, 4]])
    steps = torch.tensor([[17, 3, 20, 1, 5, 8, 2, 11], [3, 3, 3, 3, 3, 3, 3, 3], [20, 19, 18, 17, 16, 15, 14, 13]])
    noise = torch.randn(3, 8, 16, dtype=torch.float64)
    diffusion = kind == "diffrec"
    both = model.forward_two_stream(*((windows, steps, noise) if diffusion else (windows,)))
    assert both.shape == (3, 8, 16)
    slot = windows[:, -1] if diffusion else None
    single = model(model.build_input(windows[:, :-1], slot), steps[:, -1] if diffusion else None,
                   noise[:, -1:] if diffusion else None)
    torch.testing.assert_close(both[:, -1], single, rtol=1e-12, atol=1e-12)


def test_two_stream_position_t_equals_single_stream_with_slot_at_t():
    """Row t of the two-stream pass is f_theta for target w_t noised at its own step n_t, given
    w_<t: the causal single-stream pass over [w_0 .. w_{t-1}, w_t noised at n_t, ...] (z_{n_t} on
    w_t only) read at position t (later positions cannot matter). float64."""
    model = tiny_model(step_embedding="target").double()
    windows = torch.tensor([[0, 0, 3, 5, 7, 9, 11, 13], [1, 2, 3, 4, 5, 6, 7, 8]])
    steps = torch.randint(1, 21, (2, 8))
    noise = torch.randn(2, 8, 16, dtype=torch.float64)
    both = model.forward_two_stream(windows, steps, noise)
    pad = windows == 0
    with torch.no_grad():
        clean = model.embed(windows, torch.zeros(2, dtype=torch.int64), None, pad, noised_positions=0)
        noised = model.embed(windows, steps, noise, pad, noised_positions=8)  # row t: w_t noised at n_t
        for t in range(8):
            x = torch.cat([clean[:, :t], noised[:, t:t + 1], clean[:, t + 1:]], dim=1)
            single = model.encode(x, pad)[:, t]
            rows = ~pad[:, t]
            torch.testing.assert_close(both[rows, t], single[rows], rtol=1e-12, atol=1e-12)


def test_two_stream_needs_the_target_step_embedding():
    model = tiny_model(step_embedding="all")
    with pytest.raises(ValueError, match="step_embedding = 'target'"):
        model.forward_two_stream(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]), torch.ones(1, 8, dtype=torch.int64),
                                 torch.randn(1, 8, 16))


@pytest.mark.parametrize("step_embedding", ["all", "target"])
def test_forward_from_hidden_feeds_the_noised_slot_as_it_is(step_embedding):
    """Alg. 2's pass f(h_n, n) with h_n given equals the model's pass that noises the slot itself."""
    model = tiny_model(step_embedding=step_embedding).double()
    ids = model.build_input(torch.tensor([[1, 2, 3], [0, 4, 5]]))
    steps, eps = torch.tensor([5, 20]), torch.randn(2, 1, 16, dtype=torch.float64)
    slot = model.item_vectors(ids[:, -1])
    h_n = model.sqrt_abar[steps][:, None] * slot + model.sqrt_one_minus_abar[steps][:, None] * eps[:, 0]
    torch.testing.assert_close(model.forward_from_hidden(ids, steps, h_n), model(ids, steps, eps),
                               rtol=1e-12, atol=1e-12)


def test_target_only_noising_and_sasrec_has_no_diffusion():
    sasrec = tiny_model("sasrec")
    assert sasrec.noised_positions == 0 and not sasrec.add_step
    model = tiny_model(noised_positions=3)
    ids = model.build_input(torch.tensor([[1, 2, 3, 4, 5, 6, 7]]), torch.tensor([8]))
    x1 = model.embed(ids, torch.tensor([4]), torch.zeros(1, 3, 16))
    x2 = model.embed(ids, torch.tensor([4]), torch.ones(1, 3, 16))
    changed = (x1 - x2).abs().amax(-1)[0]
    assert changed[:5].max() == 0 and changed[5:].min() > 0


# ------------------------------------------------------------------------------------------ inference
def plain_reverse(model, ids, seeds, noise, visited):
    """Alg. 2 as a plain PyTorch loop over the model's pieces (no fused ops, no helpers)."""
    batch = ids.shape[0]
    rep = ids.repeat_interleave(seeds, 0)
    s = model.schedule
    n = model.num_steps
    def vectors(ids):  # sqrt(d) * P / ||P||, padding stays 0
        table = model.item_emb.weight[ids]
        return table / table.norm(dim=-1, keepdim=True).clamp_min(1e-12) * math.sqrt(model.dim)

    b = model.input_scale
    unk = vectors(torch.tensor(model.unk_id))
    h = float(s.sqrt_abar[n]) * b * unk + float(s.sqrt_one_minus_abar[n]) * noise[0].reshape(batch * seeds, -1)
    pad = rep == 0
    for i, t in enumerate(visited):
        emb = vectors(rep)
        emb = torch.cat([emb[:, :-1], h[:, None]], 1)
        j = torch.arange(model.dim) // 2
        freq = torch.exp(-math.log(10000.0) * (2.0 * j) / model.dim)
        z = torch.where(torch.arange(model.dim) % 2 == 0, torch.sin(t * freq), torch.cos(t * freq)).float()
        x = (emb + model.pos_emb * model.emb_scale + z).masked_fill(pad[:, :, None], 0.0)
        f = model.encode(model.input_ln(x), pad)[:, -1]
        if i + 1 == len(visited):
            return f.reshape(batch, seeds, -1)
        nxt = visited[i + 1]
        if nxt == t - 1:
            c0, cn, var = float(s.posterior_coef_h0[t]), float(s.posterior_coef_hn[t]), float(s.posterior_variance[t])
        else:
            c0, cn, var = posterior(model, t, nxt)
        h = c0 * b * f + cn * h + math.sqrt(var) * noise[i + 1].reshape(batch * seeds, -1)


@pytest.mark.parametrize("stride, input_scale", [(1, 1.0), (3, 1.0), (1, 0.3)])
def test_alg2_equals_plain_loop(stride, input_scale):
    model = tiny_model(input_scale=input_scale)
    ids = model.build_input(torch.tensor([[0, 0, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6, 9]]))
    visited = reverse_steps(model.num_steps, stride)
    assert visited[0] == 20 and visited[-1] >= 1 and len(visited) == math.ceil(20 / stride)
    noise = torch.randn(len(visited), 2, 3, 16, generator=torch.Generator().manual_seed(1))
    ours = predict_h0(model, ids, num_samples=3, method="alg2", stride=stride, noise=noise)
    with torch.no_grad():
        plain = plain_reverse(model, ids, 3, noise, visited)
    torch.testing.assert_close(ours, plain, rtol=1e-4, atol=1e-4)


def test_strided_posterior_matches_tables_and_single_step_is_alg3():
    model = tiny_model()
    s = model.schedule
    for t in (2, 7, 20):
        expected = (float(s.posterior_coef_h0[t]), float(s.posterior_coef_hn[t]), float(s.posterior_variance[t]))
        abar_t, abar_s = float(s.abar[t]), float(s.abar[t - 1])
        beta = 1 - abar_t / abar_s
        general = (abar_s**0.5 * beta / (1 - abar_t), (1 - beta) ** 0.5 * (1 - abar_s) / (1 - abar_t),
                   beta * (1 - abar_s) / (1 - abar_t))
        np.testing.assert_allclose(general, expected, rtol=1e-9)
    ids = model.build_input(torch.tensor([[0, 0, 3, 4, 5, 6, 7]]))
    eps = torch.randn(1, 1, 4, 16)
    alg2 = predict_h0(model, ids, num_samples=4, method="alg2", stride=20, noise=eps.permute(0, 1, 2, 3).reshape(1, 1, 4, 16))
    alg3 = predict_h0(model, ids, num_samples=4, method="alg3", noise=eps.reshape(1, 4, 1, 16))
    torch.testing.assert_close(alg2, alg3, rtol=1e-4, atol=1e-4)


def test_exclude_seen_never_returns_seen_items_or_padding():
    model = tiny_model()
    with torch.no_grad():  # make padding and the seen items the most likely, to be sure they are removed
        model.out.bias[0] = 50.0
        model.out.bias[1:8] = 40.0
    histories = [[1, 2, 3, 4, 5], [6, 7, 1], []]
    engine = InferenceEngine(model)
    ids, scores = engine.recommend_dense(histories, k=20, exclude_seen=True, num_samples=3)
    assert ids.shape == (3, 20) and scores.shape == (3, 20)
    for row, history in zip(ids.tolist(), histories):
        assert 0 not in row and not set(row) & set(history) and len(set(row)) == 20
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    ids, _ = engine.recommend_dense(histories, k=5, exclude_seen=False, num_samples=3)
    assert 0 not in ids.flatten().tolist() and set(ids[0].tolist()) <= set(range(1, 8))
    with pytest.raises(ValueError):
        engine.recommend_dense(histories, k=28, exclude_seen=True)


@pytest.mark.parametrize("exclude_seen", [False, True])
def test_target_ranks_match_dense_ranking(exclude_seen):
    model = tiny_model("sasrec")
    histories = torch.tensor([[0, 0, 0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10, 11], [0, 0, 0, 0, 0, 0, 3]])
    targets = torch.tensor([5, 2, 3])
    ranks = InferenceEngine(model).target_ranks(histories, targets, exclude_seen=exclude_seen, num_samples=1)
    with torch.no_grad():
        logits = torch.nn.functional.linear(model(model.build_input(histories)), *model.item_layer())
    for row in range(3):
        candidates = [i for i in range(1, 31) if i != int(targets[row])]
        if exclude_seen:
            candidates = [i for i in candidates if i not in histories[row].tolist()]
        expected = sum(bool(logits[row, i] >= logits[row, targets[row]]) for i in candidates)
        assert ranks[row] == expected


# ------------------------------------------------------------------------------------------ checkpoint
def test_checkpoint_round_trip_identical_outputs(tmp_path):
    config = TrainConfig(dim=16, max_len=8, num_steps=20, dropout=0.0, num_samples=2, device="cpu")
    torch.manual_seed(0)
    model = build_model(config, 30).eval()
    items = [f"item-{i}" for i in range(1, 31)]
    ckpt.save_model(tmp_path / "ck", model, config.to_dict(), items, {"note": "x"})
    # nothing pickled: every file is JSON or safetensors
    for path in (tmp_path / "ck").iterdir():
        head = path.read_bytes()[:2]
        assert head != b"\x80\x04" and (path.suffix in (".json", ".safetensors"))
    json.loads((tmp_path / "ck" / "config.json").read_text())
    loaded = Recommender.from_checkpoint(tmp_path / "ck")
    ids = model.build_input(torch.tensor([[0, 0, 3, 4, 5, 6, 7]]))
    eps = torch.randn(1, 2, 1, 16)
    torch.testing.assert_close(predict_h0(loaded.model, ids, 2, noise=eps), predict_h0(model, ids, 2, noise=eps),
                               rtol=0, atol=0)
    recs = loaded.recommend(["item-3", "item-4"], k=3)
    assert len(recs) == 3 and all(r.item.startswith("item-") for r in recs)
    with pytest.raises(ValueError, match="history: 1 unknown item id.*'unknown'"):
        loaded.recommend(["item-3", "item-4", "unknown"], k=3)
    assert not {"item-3", "item-4"} & {r.item for r in recs}
    (tmp_path / "ck" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ckpt.CheckpointError):
        Recommender.from_checkpoint(tmp_path / "ck")
    with pytest.raises(ckpt.CheckpointError):
        Recommender.from_checkpoint(tmp_path / "missing")


def test_ops_used_by_model_follow_the_reference():
    """The model's fused calls agree with the pure-PyTorch twins (compiled extension or not)."""
    from diffrec_ext import reference

    model = tiny_model()
    hidden = torch.randn(4, 3, 16)
    targets = torch.tensor([1, 5, 9, 30])
    offsets, excluded = ops.exclusion_csr([[0], [0, 1, 2], [0], [0, 30]])
    with torch.no_grad():  # inference ops: the compiled kernels have no autograd
        got = ops.seed_target_rank(hidden, model.out.weight, model.out.bias, targets, offsets, excluded)
        want = reference.seed_target_rank(hidden, model.out.weight, model.out.bias, targets, offsets, excluded)
    assert got.tolist() == want.tolist()


def test_editable_config_fields_load_and_architecture_fields_are_checked(tmp_path):
    """Every EDITABLE_FIELDS name is a TrainConfig field; editing one in config.json still loads,
    editing any other field is refused (issue 16)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(ckpt.EDITABLE_FIELDS) <= fields
    config = TrainConfig(dim=16, max_len=8, num_steps=20, dropout=0.0, num_samples=2, device="cpu")
    directory = ckpt.save_model(tmp_path / "ck", build_model(config, 30), config.to_dict(), list(range(30)))
    meta = json.loads((directory / "config.json").read_text())
    meta["config"].update(num_samples=7, inference="alg2", seed=3, dropout=0.1)
    (directory / "config.json").write_text(json.dumps(meta))
    assert ckpt.load_model(directory)[1].num_samples == 7
    meta["config"]["emb_scale"] = 10.0  # no tensor shape shows it
    (directory / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ckpt.CheckpointError, match="emb_scale = 10.0, but model.safetensors was saved with emb_scale = 50.0"):
        ckpt.load_model(directory)
