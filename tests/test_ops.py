"""Compiled CPU ops against their PyTorch twins computed in float64 (GUIDE section 4)."""

import math

import pytest
import torch

from diffrec_ext import ops
from diffrec_ext import reference as ref
from diffrec_ext.schedules import NoiseSchedule

pytestmark = pytest.mark.skipif(not ops.HAVE_EXTENSION, reason="compiled extension not built")
C = torch.ops.diffrec_ext

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float64: 1e-12}


def rel_err(out: torch.Tensor, expected: torch.Tensor) -> float:
    out, expected = out.double(), expected.double()
    assert not torch.isnan(out).any(), "output holds NaN (an unwritten element?)"
    scale = expected.abs().max().item()
    return (out - expected).abs().max().item() / (scale if scale > 0 else 1.0)


def test_extension_is_built():
    assert ops.HAVE_EXTENSION, ops.BUILD_INFO
    assert ops.BUILD_INFO["version"] == "0.1.0"


# ----------------------------------------------------------------------------- denoiser input


def denoiser_case(batch, length, dim, k, dtype, padded, num_steps=1000, seed=0, per_position=False):
    """Inputs of denoiser_input; `per_position`: steps [B, K] (one per noised position), else [B]."""
    gen = torch.Generator().manual_seed(seed)
    schedule = NoiseSchedule.create("sqrt", num_steps)
    sa, so = schedule.noising_tables(dtype=torch.float32)
    item = torch.randn(batch, length, dim, generator=gen).to(dtype)
    pos = torch.randn(length, dim, generator=gen).to(dtype)
    steps = torch.randint(0, num_steps + 1, (batch, k) if per_position else (batch,), generator=gen)
    noise = torch.randn(batch, k, dim, generator=gen).to(dtype)
    mask = None
    if padded:  # left padding: the first (T - len) positions of each row
        lengths = torch.randint(1, length + 1, (batch,), generator=gen)
        mask = torch.arange(length)[None, :] < (length - lengths)[:, None]
    return item, pos, steps, sa, so, noise, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "batch,length,dim,k", [(1, 1, 1, 1), (3, 7, 33, 0), (4, 50, 64, 1), (2, 5, 8, 5), (5, 9, 256, 3)]
)
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("add_position,add_step", [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize("per_position", [False, True])
def test_denoiser_input_matches_twin(dtype, batch, length, dim, k, padded, add_position, add_step, per_position):
    item, pos, steps, sa, so, noise, mask = denoiser_case(batch, length, dim, k, dtype, padded,
                                                          per_position=per_position)
    out = C.denoiser_input(item, pos, steps, sa, so, noise, mask, k, add_position, add_step)
    args64 = [t.double() if t is not None and t.is_floating_point() else t for t in (item, pos, steps, sa, so, noise)]
    expected = ref.denoiser_input(*args64, mask, k, add_position, add_step)
    assert out.dtype == dtype and out.shape == item.shape
    assert rel_err(out, expected) < TOLERANCE[dtype]
    if mask is not None:
        assert (out[mask] == 0).all()


def test_denoiser_input_large_steps_keep_float32_precision():
    # n * w_0 = 10000 rad: a float32 sine would be off by ~1e-3 here.
    item, pos, _, sa, so, noise, _ = denoiser_case(2, 3, 16, 1, torch.float32, False, num_steps=10000)
    steps = torch.tensor([10000, 9999])
    out = C.denoiser_input(item, pos, steps, sa, so, noise, None, 1, True, True)
    expected = ref.denoiser_input(item.double(), pos.double(), steps, sa.double(), so.double(),
                                  noise.double(), None, 1, True, True)
    assert rel_err(out, expected) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,length,dim,k", [(1, 1, 1, 1), (3, 7, 33, 2), (6, 50, 64, 50)])
@pytest.mark.parametrize("add_position", [True, False])
@pytest.mark.parametrize("per_position", [False, True])
def test_denoiser_input_backward_matches_twin(dtype, batch, length, dim, k, add_position, per_position):
    _, _, steps, sa, _, _, mask = denoiser_case(batch, length, dim, k, dtype, True, seed=1, per_position=per_position)
    grad = torch.randn(batch, length, dim).to(dtype)
    grad_item, grad_pos = C.denoiser_input_backward(grad, steps, sa, mask, k, add_position)
    exp_item, exp_pos = ref.denoiser_input_backward(grad.double(), steps, sa.double(), mask, k, add_position)
    assert rel_err(grad_item, exp_item) < TOLERANCE[dtype]
    if add_position:
        assert rel_err(grad_pos, exp_pos) < TOLERANCE[dtype] * math.sqrt(batch)
    else:
        assert (grad_pos == 0).all()


def test_denoiser_input_per_position_steps():
    """Steps [B, K]: noised position k uses steps[b, k] for its noise and its step embedding; the
    clean positions get no step embedding. The table of every step's embedding (made when there
    are more noised positions than steps) gives the values computed one by one."""
    item, pos, steps, sa, so, noise, _ = denoiser_case(40, 6, 8, 4, torch.float64, False, num_steps=20,
                                                       per_position=True)
    out = C.denoiser_input(item, pos, steps, sa.double(), so.double(), noise, None, 4, True, True)
    for b in (0, 17, 39):
        for k in range(4):
            n = int(steps[b, k])
            z = ref.step_embedding(torch.tensor([n]), 8)[0]
            want = sa[n].double() * item[b, 2 + k] + so[n].double() * noise[b, k] + pos[2 + k] + z
            torch.testing.assert_close(out[b, 2 + k], want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out[b, :2], item[b, :2] + pos[:2], rtol=1e-12, atol=1e-12)
    few = C.denoiser_input(item[:2], pos, steps[:2], sa.double(), so.double(), noise[:2], None, 4, True, True)
    assert torch.equal(few, out[:2])  # computed without the table: the same bits


@pytest.mark.parametrize("per_position", [False, True])
def test_denoiser_input_gradcheck(per_position):
    item, pos, steps, sa, so, noise, mask = denoiser_case(3, 4, 5, 2, torch.float64, True, num_steps=50,
                                                          per_position=per_position)
    item.requires_grad_(True)
    pos.requires_grad_(True)
    sa, so = sa.double(), so.double()
    fn = lambda i, p: ops.denoiser_input(i, p, steps, sa, so, noise, mask, 2, True, True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (item, pos))


# ----------------------------------------------------------------------------- seed-averaged scores


def catalog_case(batch, seeds, dim, num_items, dtype, with_bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seeds, dim, generator=gen).to(dtype)
    weight = (torch.randn(num_items, dim, generator=gen) * (2.0 / math.sqrt(dim))).to(dtype)
    bias = torch.randn(num_items, generator=gen).to(dtype) if with_bias else None
    return hidden, weight, bias


def random_exclusions(batch, num_items, seed=0, max_per_user=12):
    gen = torch.Generator().manual_seed(seed)
    lists = []
    for _ in range(batch):
        count = int(torch.randint(0, max_per_user + 1, (1,), generator=gen))
        lists.append(torch.randint(0, num_items, (count,), generator=gen).tolist())
    return ops.exclusion_csr(lists)


def f64(*tensors):
    return [t.double() if t is not None else None for t in tensors]


SEED_CASES = [
    # batch, seeds, dim, V, k
    (1, 1, 1, 1, 1),
    (3, 10, 16, 1000, 1),
    (2, 3, 8, 300, 300),
    (64, 10, 16, 7919, 20),  # several catalog tiles, V prime
    (5, 2, 33, 4099, 64),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,seeds,dim,num_items,k", SEED_CASES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_seed_avg_probs_matches_twin(dtype, batch, seeds, dim, num_items, k, with_bias):
    hidden, weight, bias = catalog_case(batch, seeds, dim, num_items, dtype, with_bias)
    out = C.seed_avg_probs(hidden, weight, bias)
    expected = ref.seed_avg_probs(*f64(hidden, weight, bias))
    assert out.dtype == torch.float32 and out.shape == (batch, num_items)
    assert rel_err(out, expected) < 1e-5  # float32 accumulation of exactly representable inputs


def assert_topk_close(values, indices, hidden, weight, bias, k, offsets=None, ids=None):
    expected_values, _ = ref.seed_topk(*f64(hidden, weight, bias), k, offsets, ids)
    assert rel_err(values, expected_values) < 1e-5
    scores = ref.seed_avg_probs(*f64(hidden, weight, bias))
    # Each returned item really has the returned score (ties may pick different items)...
    assert rel_err(scores.gather(1, indices), expected_values) < 1e-5
    # ...and is distinct, not excluded, and the values are sorted.
    assert all(len(set(row)) == k for row in indices.tolist())
    if offsets is not None:
        mask = ref.exclusion_mask(offsets, ids, *scores.shape, scores.device)
        assert not mask.gather(1, indices).any()
    assert (values[:, :-1] >= values[:, 1:]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,seeds,dim,num_items,k", SEED_CASES)
@pytest.mark.parametrize("exclude", [False, True])
def test_seed_topk_matches_twin(dtype, batch, seeds, dim, num_items, k, exclude):
    hidden, weight, bias = catalog_case(batch, seeds, dim, num_items, dtype, seed=2)
    offsets = ids = None
    if exclude and num_items > k + 12:
        offsets, ids = random_exclusions(batch, num_items)
    values, indices = C.seed_topk(hidden, weight, bias, k, offsets, ids)
    assert values.shape == (batch, k) and indices.dtype == torch.int64
    assert_topk_close(values, indices, hidden, weight, bias, k, offsets, ids)


def test_seed_topk_ties_prefer_smaller_ids():
    hidden = torch.zeros(2, 3, 4)
    weight = torch.zeros(10, 4)  # every item has the same score 1/10
    values, indices = C.seed_topk(hidden, weight, None, 4, None, None)
    assert indices.tolist() == [[0, 1, 2, 3]] * 2
    assert torch.allclose(values, torch.full((2, 4), 0.1))


def test_seed_topk_exclusion_of_all_but_k():
    hidden, weight, bias = catalog_case(1, 2, 8, 20, torch.float32)
    offsets, ids = ops.exclusion_csr([list(range(0, 20, 2))])
    values, indices = C.seed_topk(hidden, weight, bias, 10, offsets, ids)
    assert sorted(indices[0].tolist()) == list(range(1, 20, 2))


def rank_slack(scores, targets, rel=1e-5):
    """Items whose float64 score is within rounding of the target's: ranks may differ by these."""
    target_scores = scores.gather(1, targets[:, None])
    return ((scores - target_scores).abs() <= rel * target_scores.abs()).sum(1) - 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,seeds,dim,num_items,k", SEED_CASES)
@pytest.mark.parametrize("exclude", [False, True])
def test_seed_target_rank_matches_twin(dtype, batch, seeds, dim, num_items, k, exclude):
    hidden, weight, bias = catalog_case(batch, seeds, dim, num_items, dtype, seed=3)
    targets = torch.randint(0, num_items, (batch,), generator=torch.Generator().manual_seed(4))
    offsets = ids = None
    if exclude:
        offsets, ids = random_exclusions(batch, num_items, seed=5)
    ranks = C.seed_target_rank(hidden, weight, bias, targets, offsets, ids)
    expected = ref.seed_target_rank(*f64(hidden, weight, bias), targets, offsets, ids)
    slack = rank_slack(ref.seed_avg_probs(*f64(hidden, weight, bias)), targets)
    assert ranks.dtype == torch.int64
    assert ((ranks - expected).abs() <= slack).all(), (ranks, expected)


def test_seed_target_rank_counts_ties_against_the_target():
    hidden = torch.zeros(1, 2, 4)
    weight = torch.zeros(7, 4)
    ranks = C.seed_target_rank(hidden, weight, None, torch.tensor([3]), None, None)
    assert ranks.tolist() == [6]


def test_seed_topk_is_consistent_with_target_rank():
    hidden, weight, bias = catalog_case(8, 4, 16, 5000, torch.float32, seed=6)
    _, indices = C.seed_topk(hidden, weight, bias, 10, None, None)
    ranks = C.seed_target_rank(hidden, weight, bias, indices[:, 3].contiguous(), None, None)
    assert ranks.tolist() == [3] * 8


# ----------------------------------------------------------------------------- catalog cross-entropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,dim,num_items", [(1, 1, 1), (7, 33, 1000), (256, 16, 9001), (3, 64, 40000)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_catalog_xent_matches_twin(dtype, batch, dim, num_items, with_bias):
    hidden, weight, bias = catalog_case(batch, 1, dim, num_items, dtype, with_bias, seed=7)
    hidden = hidden[:, 0].contiguous()
    targets = torch.randint(0, num_items, (batch,), generator=torch.Generator().manual_seed(8))
    loss, lse = C.catalog_xent(hidden, weight, bias, targets)
    exp_loss, exp_lse = ref.catalog_xent(*f64(hidden, weight, bias), targets)
    assert rel_err(lse, exp_lse) < 1e-5
    assert rel_err(loss, exp_loss) < 1e-5 or num_items == 1

    grad_loss = torch.rand(batch)
    grads = C.catalog_xent_backward(grad_loss, hidden, weight, bias, targets, lse)
    expected = ref.catalog_xent_backward(grad_loss.double(), *f64(hidden, weight, bias), targets, exp_lse)
    for got, want, like in zip(grads, expected, (hidden, weight, weight)):
        assert got.dtype == like.dtype and got.shape == want.shape
        assert rel_err(got, want) < TOLERANCE[dtype]


def test_catalog_xent_gradcheck():
    hidden, weight, bias = catalog_case(4, 1, 6, 37, torch.float64, seed=9)
    hidden = hidden[:, 0].contiguous()
    targets = torch.tensor([0, 36, 5, 5])
    inputs = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    assert torch.autograd.gradcheck(lambda h, w, b: ops.catalog_xent(h, w, b, targets)[0], inputs)


def test_catalog_xent_autograd_matches_eager():
    hidden, weight, bias = catalog_case(16, 1, 8, 500, torch.float32, seed=10)
    hidden = hidden[:, 0].contiguous()
    targets = torch.randint(0, 500, (16,))
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    ops.catalog_xent(*leaves, targets)[0].mean().backward()
    eager = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    torch.nn.functional.cross_entropy(eager[0] @ eager[1].T + eager[2], targets).backward()
    for ours, theirs in zip(leaves, eager):
        assert rel_err(ours.grad, theirs.grad) < 1e-5


# ----------------------------------------------------------------------------- opcheck and compile


def opcheck_cases():
    item, pos, steps, sa, so, noise, mask = denoiser_case(3, 5, 8, 1, torch.float32, True)
    hidden, weight, bias = catalog_case(3, 2, 8, 50, torch.float32)
    offsets, ids = random_exclusions(3, 50)
    targets = torch.tensor([1, 2, 49])
    hidden2 = hidden[:, 0].contiguous()
    _, lse = C.catalog_xent(hidden2, weight, bias, targets)
    seed_lse = torch.logsumexp(torch.einsum("bsd,vd->bsv", hidden, weight), -1) + 0.5
    grad = lambda t: t.clone().requires_grad_(True)  # noqa: E731
    return [
        (C.denoiser_input, (grad(item), grad(pos), steps, sa, so, noise, mask, 1, True, True)),
        (C.denoiser_input, (item, pos, steps, sa, so, noise, None, 1, False, True)),
        (C.denoiser_input, (grad(item), grad(pos), steps[:, None], sa, so, noise, mask, 1, True, True)),
        (C.seeded_dropout, (grad(item), 0.3, 12345)),
        (C.denoiser_input_backward, (item, steps, sa, mask, 1, True)),
        (C.seed_avg_probs, (hidden, weight, bias)),
        (C.seed_topk, (hidden, weight, bias, 5, offsets, ids)),
        (C.seed_topk, (hidden, weight, None, 50, None, None)),
        (C.seed_target_rank, (hidden, weight, bias, targets, offsets, ids)),
        (C.seed_avg_probs, (grad(hidden), grad(weight), grad(bias))),
        (C.seed_avg_probs, (grad(hidden), weight, None, grad(seed_lse))),
        (C.seed_topk, (grad(hidden), grad(weight), grad(bias), 5, offsets, ids)),
        (C.seed_topk, (grad(hidden), grad(weight), bias, 4, None, None, grad(seed_lse))),
        (C.denoiser_input, (grad(item), grad(pos), steps, grad(sa), grad(so), grad(noise), mask, 1, True, True)),
        (C.catalog_xent, (grad(hidden2), grad(weight), grad(bias), targets)),
        (C.catalog_xent, (grad(hidden2), grad(weight), None, targets)),
        (C.catalog_xent_backward, (torch.rand(3), hidden2, weight, bias, targets, lse)),
    ]


@pytest.mark.parametrize("case", range(len(opcheck_cases())))
def test_opcheck(case):
    op, args = opcheck_cases()[case]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("case", range(len(opcheck_cases())))
def test_ops_run_at_their_input_dtypes_under_autocast(case):
    # bf16 training autocasts the model around these ops; their internal GEMMs must stay float32
    op, args = opcheck_cases()[case]
    plain = op(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = op(*args)
    torch.testing.assert_close(under_autocast, plain, rtol=0, atol=0)


def test_ops_under_torch_compile_fullgraph():
    item, pos, steps, sa, so, noise, mask = denoiser_case(4, 6, 16, 1, torch.float32, True)
    hidden, weight, bias = catalog_case(4, 3, 16, 300, torch.float32)
    targets = torch.randint(0, 300, (4,))

    def pipeline(item, pos, hidden, weight, bias):
        x = ops.denoiser_input(item, pos, steps, sa, so, noise, mask, 1, True, True)
        x = ops.seeded_dropout(x, 0.25, 99)
        loss, _ = ops.catalog_xent(x[:, -1], weight, bias, targets)
        values, indices = ops.seed_topk(hidden, weight, bias, 5)
        ranks = ops.seed_target_rank(hidden, weight, bias, targets)
        return x.sum() + loss.mean(), values, indices, ranks, ops.seed_avg_probs(hidden, weight, bias)

    compiled = torch.compile(pipeline, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(item, pos, hidden, weight, bias), pipeline(item, pos, hidden, weight, bias)):
        torch.testing.assert_close(got, want)


# ----------------------------------------------------------------------------- bad input


def test_bad_denoiser_inputs_are_named():
    item, pos, steps, sa, so, noise, mask = denoiser_case(2, 4, 8, 1, torch.float32, True, num_steps=10)
    call = lambda **kw: C.denoiser_input(  # noqa: E731
        kw.get("item", item), kw.get("pos", pos), kw.get("steps", steps), sa, so,
        kw.get("noise", noise), kw.get("mask", mask), kw.get("k", 1), True, True)
    with pytest.raises(RuntimeError, match=r"steps\[1\] = 11 is out of range \[0, 10\]"):
        call(steps=torch.tensor([3, 11]))
    with pytest.raises(RuntimeError, match=r"steps\[0\] = -1"):
        call(steps=torch.tensor([-1, 0]))
    with pytest.raises(RuntimeError, match="steps must be int64"):
        call(steps=steps.int())
    with pytest.raises(RuntimeError, match="pos_emb must be \\[T, d\\]"):
        call(pos=pos[:3])
    with pytest.raises(RuntimeError, match="noise must be \\[B, noised_positions, d\\]"):
        call(k=2)
    with pytest.raises(RuntimeError, match=r"steps must be \[B\] = \[2\] or \[B, noised_positions\] = \[2, 1\], "
                                           r"got shape \[2, 3\]"):
        call(steps=torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="noised_positions = 5 must be in"):
        call(k=5, noise=torch.randn(2, 5, 8))
    with pytest.raises(RuntimeError, match="item_emb must be float32, float64, bfloat16 or float16"):
        call(item=item.long())
    with pytest.raises(RuntimeError, match="pos_emb dtype"):
        call(pos=pos.double())
    with pytest.raises(RuntimeError, match="padding_mask must be bool"):
        call(mask=mask.int())
    with pytest.raises(RuntimeError, match="empty batch"):
        call(item=item[:0], steps=steps[:0], noise=noise[:0], mask=mask[:0])


def test_bad_catalog_inputs_are_named():
    hidden, weight, bias = catalog_case(2, 3, 8, 40, torch.float32)
    hidden3, _, _ = catalog_case(3, 3, 8, 40, torch.float32)
    with pytest.raises(RuntimeError, match="k = 0 must be in \\[1, V = 40\\]"):
        C.seed_topk(hidden, weight, bias, 0, None, None)
    with pytest.raises(RuntimeError, match="k = 41 must be in \\[1, V = 40\\]"):
        C.seed_topk(hidden, weight, bias, 41, None, None)
    with pytest.raises(RuntimeError, match="weight must be \\[V, d\\] with d = 8"):
        C.seed_topk(hidden, weight[:, :4], bias, 3, None, None)
    with pytest.raises(RuntimeError, match="bias must be \\[V\\]"):
        C.seed_avg_probs(hidden, weight, bias[:5])
    with pytest.raises(RuntimeError, match="weight dtype"):
        C.seed_avg_probs(hidden, weight.double(), bias)
    with pytest.raises(RuntimeError, match="hidden must be \\[B, S, d\\]"):
        C.seed_avg_probs(hidden[0], weight, bias)
    with pytest.raises(RuntimeError, match="empty batch"):
        C.seed_topk(hidden[:0], weight, bias, 3, None, None)
    with pytest.raises(RuntimeError, match=r"targets\[1\] = 40 is out of range \[0, 39\]"):
        C.seed_target_rank(hidden, weight, bias, torch.tensor([0, 40]), None, None)
    with pytest.raises(RuntimeError, match=r"exclude_ids\[2\] = 99 is out of range"):
        C.seed_topk(hidden, weight, bias, 3, torch.tensor([0, 1, 3]), torch.tensor([1, 2, 99]))
    with pytest.raises(RuntimeError, match="exclude_offsets must be non-decreasing"):
        C.seed_topk(hidden3, weight, bias, 3, torch.tensor([0, 2, 1, 2]), torch.tensor([1, 2]))
    with pytest.raises(RuntimeError, match="must equal len\\(exclude_ids\\)"):
        C.seed_topk(hidden, weight, bias, 3, torch.tensor([0, 1, 1]), torch.tensor([1, 2]))
    with pytest.raises(RuntimeError, match="given together"):
        C.seed_topk(hidden, weight, bias, 3, torch.tensor([0, 1, 1]), None)
    offsets, ids = ops.exclusion_csr([list(range(38)), []])
    with pytest.raises(RuntimeError, match="k = 3 exceeds the 2 items left for user 0"):
        C.seed_topk(hidden, weight, bias, 3, offsets, ids)
    with pytest.raises(RuntimeError, match=r"targets\[0\] = -3"):
        C.catalog_xent(hidden[:, 0].contiguous(), weight, bias, torch.tensor([-3, 0]))
    with pytest.raises(RuntimeError, match="targets must be \\[B\\]"):
        C.catalog_xent(hidden[:, 0].contiguous(), weight, bias, torch.tensor([0]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device mismatch needs a second device type")
def test_device_mismatch_is_named():
    hidden, weight, bias = catalog_case(2, 3, 8, 40, torch.float32)
    with pytest.raises(RuntimeError, match="weight is on cuda"):
        C.seed_avg_probs(hidden, weight.cuda(), bias)


def test_python_fallback_twins_share_the_contract(monkeypatch):
    """With the extension missing, the wrappers run the twins and give the same results."""
    hidden, weight, bias = catalog_case(3, 2, 8, 60, torch.float32)
    compiled = ops.seed_topk(hidden, weight, bias, 4)
    monkeypatch.setattr(ops, "HAVE_EXTENSION", False)
    fallback = ops.seed_topk(hidden, weight, bias, 4)
    torch.testing.assert_close(compiled[0], fallback[0])
    assert torch.equal(compiled[1], fallback[1])


# ----------------------------------------------------------------------------- catalog shards


def test_seed_ops_on_catalog_shards_with_the_global_lse():
    """A catalog cut in shards gives the single-catalog results once each shard gets the global lse."""
    hidden, weight, bias = catalog_case(6, 4, 16, 3001, torch.float32, seed=11)
    _, full_lse = C.catalog_xent(hidden.reshape(-1, 16), weight, bias, torch.zeros(24, dtype=torch.int64))
    full_lse = full_lse.view(6, 4)
    cuts = [0, 1000, 2200, 3001]
    probs, candidates = [], []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        w, b = weight[lo:hi].contiguous(), bias[lo:hi].contiguous()
        probs.append(C.seed_avg_probs(hidden, w, b, full_lse))
        values, ids = C.seed_topk(hidden, w, b, 10, None, None, full_lse)
        candidates.append((values, ids + lo))
    torch.testing.assert_close(torch.cat(probs, 1), C.seed_avg_probs(hidden, weight, bias), rtol=1e-5, atol=0)
    merged_values = torch.cat([v for v, _ in candidates], 1)
    merged_ids = torch.cat([i for _, i in candidates], 1)
    top_values, order = merged_values.topk(10, dim=1)
    expected_values, expected_ids = C.seed_topk(hidden, weight, bias, 10, None, None)
    torch.testing.assert_close(top_values, expected_values, rtol=1e-5, atol=0)
    assert torch.equal(merged_ids.gather(1, order), expected_ids)


def test_catalog_xent_absent_targets_match_twin():
    hidden, weight, bias = catalog_case(5, 1, 8, 300, torch.float64, seed=12)
    hidden = hidden[:, 0].contiguous()
    targets = torch.tensor([-1, 3, -1, 299, 0])
    loss, lse = C.catalog_xent(hidden, weight, bias, targets)
    exp_loss, exp_lse = ref.catalog_xent(hidden, weight, bias, targets)
    torch.testing.assert_close(loss, exp_loss)
    torch.testing.assert_close(loss[targets < 0], lse[targets < 0])
    grad_loss = torch.rand(5, dtype=torch.float64)
    for got, want in zip(C.catalog_xent_backward(grad_loss, hidden, weight, bias, targets, lse),
                         ref.catalog_xent_backward(grad_loss, hidden, weight, bias, targets, exp_lse)):
        torch.testing.assert_close(got, want)
    with pytest.raises(RuntimeError, match=r"targets\[0\] = -2 is out of range \[-1, 299\]"):
        C.catalog_xent(hidden, weight, bias, torch.tensor([-2, 0, 0, 0, 0]))


def test_bad_lse_is_named():
    hidden, weight, bias = catalog_case(2, 3, 8, 40, torch.float32)
    with pytest.raises(RuntimeError, match="lse must be \\[B, S\\] = \\[2, 3\\]"):
        C.seed_topk(hidden, weight, bias, 3, None, None, torch.zeros(2, 4))
    with pytest.raises(RuntimeError, match="lse must be Float for BFloat16 hidden"):
        C.seed_topk(hidden.bfloat16(), weight.bfloat16(), bias.bfloat16(), 3, None, None, torch.zeros(2, 3).double())


def test_integer_outputs_never_require_grad():
    hidden, weight, bias = catalog_case(3, 2, 8, 50, torch.float32)
    weight.requires_grad_(True)
    values, ids = C.seed_topk(hidden, weight, bias, 4, None, None)
    ranks = C.seed_target_rank(hidden, weight, bias, torch.tensor([1, 2, 3]), None, None)
    assert not torch.isnan(values).any() and ranks.shape == (3,)
    assert values.requires_grad and not ids.requires_grad and not ranks.requires_grad


# ----------------------------------------------------------------------------- gradients of every output
# Issue 16: every floating output of every op carries its gradient (gradcheck in float64 over all of
# them, with respect to every floating input), integer outputs never require grad, and an op whose
# gradient is a compiled kernel refuses a double backward with a clear error.


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def test_catalog_xent_lse_output_carries_its_gradient():
    """Bug 1: backward through the lse output left hidden.grad all zeros."""
    gen = torch.Generator().manual_seed(20)
    hidden, weight = torch.randn(3, 8, generator=gen), torch.randn(20, 8, generator=gen)
    targets = torch.tensor([1, 2, 3])
    ours, twin = leaves(hidden), leaves(hidden)
    ops.catalog_xent(ours[0], weight, None, targets)[1].sum().backward()
    ref.catalog_xent(twin[0], weight, None, targets)[1].sum().backward()
    assert ours[0].grad.abs().max() > 0.1
    torch.testing.assert_close(ours[0].grad, twin[0].grad)
    # both outputs together, with a bias and an absent (-1) target
    bias = torch.randn(20, generator=gen)
    targets = torch.tensor([1, -1, 19])
    ours, twin = leaves(hidden, weight, bias), leaves(hidden, weight, bias)
    for fn, args in ((ops.catalog_xent, ours), (ref.catalog_xent, twin)):
        loss, lse = fn(*args, targets)
        (loss + 0.5 * lse).sum().backward()
    for got, want in zip(ours, twin):
        torch.testing.assert_close(got.grad, want.grad)


@pytest.mark.parametrize("op", ["catalog_xent", "denoiser_input"])
def test_double_backward_of_compiled_gradients_raises(op):
    """Bug 2: a backward through catalog_xent's gradient was silently zero (with a UserWarning)."""
    if op == "catalog_xent":
        hidden, weight, bias = leaves(*catalog_case(4, 1, 6, 30, torch.float64, seed=21))
        hidden = hidden[:, 0]
        out = ops.catalog_xent(hidden, weight, bias, torch.tensor([0, 3, -1, 29]))[0]
        wrt = hidden
    else:
        item, pos, steps, sa, so, noise, mask = denoiser_case(3, 4, 5, 2, torch.float64, True, num_steps=50)
        item, pos = leaves(item, pos)
        out = ops.denoiser_input(item, pos, steps, sa.double(), so.double(), noise, mask, 2, True, True)
        out = out.pow(2)
        wrt = item
    (grad,) = torch.autograd.grad(out.sum(), wrt, create_graph=True)
    assert grad.requires_grad
    with pytest.raises(RuntimeError, match=f"{op} has no double backward .* diffrec_ext.reference.{op}"):
        (grad.pow(2).sum() + wrt.sum()).backward()


def test_first_order_gradients_are_unchanged_under_create_graph():
    hidden, weight, bias = leaves(*catalog_case(4, 1, 6, 30, torch.float64, seed=22))
    targets = torch.tensor([0, 3, -1, 29])
    loss = ops.catalog_xent(hidden[:, 0], weight, bias, targets)[0].sum()
    plain = torch.autograd.grad(loss, (hidden, weight, bias), retain_graph=True)
    marked = torch.autograd.grad(loss, (hidden, weight, bias), create_graph=True)
    for a, b in zip(plain, marked):
        assert torch.equal(a, b.detach())


@pytest.mark.parametrize("op", ["seed_avg_probs", "seed_topk"])
def test_seed_op_outputs_carry_their_gradient(op):
    """Bug 3: outputs said requires_grad=True but backward left hidden.grad None."""
    hidden, weight, bias = catalog_case(3, 4, 8, 50, torch.float32, seed=23)
    ours, twin = leaves(hidden), leaves(hidden)
    if op == "seed_avg_probs":
        ops.seed_avg_probs(ours[0], weight, bias)[:, :7].sum().backward()
        ref.seed_avg_probs(twin[0], weight, bias)[:, :7].sum().backward()
    else:
        ops.seed_topk(ours[0], weight, bias, 5)[0].sum().backward()
        ref.seed_topk(twin[0], weight, bias, 5)[0].sum().backward()
    assert ours[0].grad is not None
    torch.testing.assert_close(ours[0].grad, twin[0].grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("k,add_position", [(2, True), (1, False), (4, True)])
@pytest.mark.parametrize("per_position", [False, True])
def test_denoiser_input_gradcheck_every_input(k, add_position, per_position):
    """item_emb, pos_emb, both noise tables and the noise: every floating input; steps [B] or [B, K]."""
    item, pos, steps, sa, so, noise, mask = denoiser_case(3, 4, 3, k, torch.float64, True, num_steps=6,
                                                          per_position=per_position)
    inputs = leaves(item, pos, sa.double(), so.double(), noise)
    fn = lambda i, p, a, s, n: ops.denoiser_input(i, p, steps, a, s, n, mask, k, add_position, True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)


def xent_outputs(*args):
    return ops.catalog_xent(*args[:3], args[3])


def test_catalog_xent_gradcheck_both_outputs():
    hidden, weight, bias = catalog_case(5, 1, 6, 37, torch.float64, seed=24)
    targets = torch.tensor([0, 36, -1, 5, 5])
    inputs = leaves(hidden[:, 0], weight, bias)
    assert torch.autograd.gradcheck(lambda h, w, b: ops.catalog_xent(h, w, b, targets), inputs)
    assert torch.autograd.gradcheck(lambda h, w: ops.catalog_xent(h, w, None, targets), inputs[:2])


@pytest.fixture(params=[None, 64], ids=["one-tile", "tiles-of-64-logits"])
def catalog_tiles(request, monkeypatch):
    """The seed ops' backward walks the catalog in tiles: run it with many small ones too."""
    if request.param is not None:
        monkeypatch.setattr(ops, "_TILE_LOGITS", request.param)


def seed_inputs(with_bias=True, with_lse=False, seed=25, num_items=13):
    hidden, weight, bias = catalog_case(2, 3, 4, num_items, torch.float64, with_bias, seed=seed)
    lse = None
    if with_lse:  # a catalog normaliser that differs from this weight's own (a shard of a bigger catalog)
        lse = torch.logsumexp(torch.einsum("bsd,vd->bsv", hidden, weight), -1) + 0.7
    return [t for t in leaves(hidden, weight) + (leaves(bias) if with_bias else [None])] + (
        leaves(lse) if with_lse else [None])


@pytest.mark.parametrize("with_bias,with_lse", [(True, False), (False, True), (True, True)])
def test_seed_avg_probs_gradcheck(catalog_tiles, with_bias, with_lse):
    hidden, weight, bias, lse = seed_inputs(with_bias, with_lse)
    differentiable = [t for t in (hidden, weight, bias, lse) if t is not None]

    def fn(*args):
        it = iter(args)
        return ops.seed_avg_probs(next(it), next(it), next(it) if with_bias else None, next(it) if with_lse else None)

    assert torch.autograd.gradcheck(fn, differentiable)
    assert torch.autograd.gradgradcheck(fn, differentiable, fast_mode=True)  # the gradient is plain PyTorch


@pytest.mark.parametrize("with_bias,with_lse,exclude", [(True, False, True), (False, True, False), (True, True, True)])
def test_seed_topk_values_gradcheck(catalog_tiles, with_bias, with_lse, exclude):
    hidden, weight, bias, lse = seed_inputs(with_bias, with_lse, seed=26)
    differentiable = [t for t in (hidden, weight, bias, lse) if t is not None]
    offsets, ids = ops.exclusion_csr([[0, 3], [5, 6, 7]]) if exclude else (None, None)

    def fn(*args):
        it = iter(args)
        return ops.seed_topk(next(it), next(it), next(it) if with_bias else None, 6, offsets, ids,
                             next(it) if with_lse else None)[0]

    assert torch.autograd.gradcheck(fn, differentiable)
    assert torch.autograd.gradgradcheck(fn, differentiable, fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_seed_op_gradients_match_the_twins_over_many_tiles(dtype):
    """float32/bf16 inputs, a catalog of several default tiles: the gradients of the twins' autograd
    in float64 (the twin materialises [B, S, V])."""
    hidden, weight, bias = catalog_case(64, 10, 16, 7919, dtype, seed=27)
    grad_probs = torch.randn(64, 7919, generator=torch.Generator().manual_seed(28)).to(dtype)
    ours, twin = leaves(hidden, weight, bias), leaves(*f64(hidden, weight, bias))
    (ops.seed_avg_probs(*ours).to(dtype) * grad_probs).sum().backward()
    (ref.seed_avg_probs(*twin) * grad_probs.double()).sum().backward()
    for got, want, like in zip(ours, twin, (hidden, weight, bias)):
        assert got.grad.dtype == like.dtype
        assert rel_err(got.grad, want.grad) < TOLERANCE[dtype] * 10
    ours, twin = leaves(hidden, weight, bias), leaves(*f64(hidden, weight, bias))
    values, ids = ops.seed_topk(*ours, 20)
    (values * torch.linspace(1, 2, 20)).sum().backward()
    scores = ref.seed_avg_probs(*twin)
    (scores.gather(1, ids) * torch.linspace(1, 2, 20, dtype=torch.float64)).sum().backward()
    for got, want in zip(ours, twin):
        assert rel_err(got.grad, want.grad) < TOLERANCE[dtype] * 10


def test_gradients_under_torch_compile_fullgraph():
    hidden, weight, bias = catalog_case(4, 3, 8, 200, torch.float32, seed=29)
    targets = torch.tensor([0, 5, -1, 199])

    def losses(hidden, weight, bias):
        loss, lse = ops.catalog_xent(hidden[:, 0], weight, bias, targets)
        values, _ = ops.seed_topk(hidden, weight, bias, 5)
        probs = ops.seed_avg_probs(hidden, weight, bias)
        return (loss + 0.5 * lse).sum() + values.sum() + probs[:, :10].sum()

    compiled = torch.compile(losses, fullgraph=True, backend="aot_eager")
    eager_inputs, compiled_inputs = leaves(hidden, weight, bias), leaves(hidden, weight, bias)
    losses(*eager_inputs).backward()
    compiled(*compiled_inputs).backward()
    for got, want in zip(compiled_inputs, eager_inputs):
        torch.testing.assert_close(got.grad, want.grad)



# ----------------------------------------------------------------------------- seeded dropout


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1,), (7, 3), (5, 4099), (2, 3, 4, 5), (0, 3)])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.95])
def test_seeded_dropout_matches_twin_bit_for_bit(dtype, shape, p):
    x = torch.randn(shape).to(dtype)
    seed = 0x1234_5678_9ABC_DEF0 - 2**63  # negative: the seed is 64 bits of any sign
    out = C.seeded_dropout(x, p, seed)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out, ref.seeded_dropout(x, p, seed))


def test_seeded_dropout_mask_statistics():
    x = torch.ones(1 << 20)
    for p in (0.1, 0.3, 0.5):
        kept = C.seeded_dropout(x, p, 7) != 0
        # binomial standard deviation is ~5e-4 here: 6 of them
        assert abs(kept.double().mean().item() - (1 - p)) < 3e-3
        values = C.seeded_dropout(x, p, 7)[kept]
        torch.testing.assert_close(values, torch.full_like(values, 1 / (1 - p)))
    a, b = (C.seeded_dropout(x, 0.5, seed) != 0 for seed in (1, 2))
    assert 0.45 < (a == b).double().mean().item() < 0.55  # another seed, an independent mask
    assert torch.equal(C.seeded_dropout(x, 0.5, 1), C.seeded_dropout(x, 0.5, 1))  # the same seed, the same mask
    neighbours = (a[1:] == a[:-1]).double().mean().item()  # no correlation between adjacent elements
    assert 0.49 < neighbours < 0.51


def test_seeded_dropout_gradient_reuses_the_mask():
    x = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: ops.seeded_dropout(v, 0.4, 21), (x,))
    out = ops.seeded_dropout(x, 0.4, 21)
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(x.grad, (out != 0).double() / 0.6)


def test_seeded_dropout_bad_input():
    with pytest.raises(RuntimeError, match=r"p must be in \[0, 1\), got 1"):
        C.seeded_dropout(torch.ones(3), 1.0, 0)
    with pytest.raises(RuntimeError, match=r"p must be in \[0, 1\), got -0.1"):
        C.seeded_dropout(torch.ones(3), -0.1, 0)
    with pytest.raises(RuntimeError, match="input must be float32, float64, bfloat16 or float16"):
        C.seeded_dropout(torch.ones(3, dtype=torch.int64), 0.5, 0)
    strided = torch.randn(4, 6)[:, ::2]  # not contiguous: masked in the order of its elements
    assert torch.equal(C.seeded_dropout(strided, 0.5, 3), C.seeded_dropout(strided.contiguous(), 0.5, 3))
