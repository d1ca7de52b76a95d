"""Property-based checks of every compiled op against its float64 twin (hypothesis, 200 cases per op):
random shapes down to one user / one item / k = V, dtypes, and extreme values (huge or tiny
logits, all-equal scores). No crash, no NaN, no silent wrong result."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffrec_ext import ops
from diffrec_ext import reference as ref

pytestmark = pytest.mark.skipif(not ops.HAVE_EXTENSION, reason="compiled extension not built")
C = torch.ops.diffrec_ext
CASES = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

DTYPES = st.sampled_from([torch.float32, torch.float64, torch.bfloat16])
# Logit scales from nearly-uniform to saturating softmax; 0 makes every score equal.
SCALES = st.sampled_from([0.0, 1e-4, 1.0, 8.0, 60.0])
TOL = {torch.float32: 2e-5, torch.float64: 1e-10, torch.bfloat16: 2e-5}


def rel_err(out, expected):
    out, expected = out.double(), expected.double()
    assert not torch.isnan(out).any()
    scale = expected.abs().max().item()
    return (out - expected).abs().max().item() / (scale if scale > 0 else 1.0)


@st.composite
def catalogs(draw, seeded=True):
    batch = draw(st.integers(1, 6))
    seeds = draw(st.integers(1, 5)) if seeded else 1
    dim = draw(st.integers(1, 24))
    num_items = draw(st.integers(1, 700))
    dtype = draw(DTYPES)
    scale = draw(SCALES)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    hidden = torch.randn(batch, seeds, dim, generator=gen, dtype=torch.float64)
    weight = torch.randn(num_items, dim, generator=gen, dtype=torch.float64) * scale / math.sqrt(dim)
    bias = torch.randn(num_items, generator=gen, dtype=torch.float64) * scale if draw(st.booleans()) else None
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    if not seeded:
        hidden = hidden[:, 0]
    return cast(hidden), cast(weight), cast(bias), gen


def f64(*tensors):
    return [None if t is None else t.double() for t in tensors]


def exclusions(draw, batch, num_items, keep):
    """A random CSR exclusion list that leaves at least `keep` items per user."""
    lists = []
    for _ in range(batch):
        allowed = max(0, num_items - keep)
        lists.append(draw(st.lists(st.integers(0, num_items - 1), max_size=min(allowed, 20), unique=True)))
    return ops.exclusion_csr(lists)


@CASES
@given(catalogs(), st.data())
def test_seed_topk_property(case, data):
    hidden, weight, bias, _ = case
    num_items = weight.shape[0]
    k = data.draw(st.integers(1, num_items))
    offsets, ids = exclusions(data.draw, hidden.shape[0], num_items, k) if data.draw(st.booleans()) else (None, None)
    values, indices = C.seed_topk(hidden, weight, bias, k, offsets, ids)
    expected, _ = ref.seed_topk(*f64(hidden, weight, bias), k, offsets, ids)
    assert rel_err(values, expected) < TOL[hidden.dtype]
    scores = ref.seed_avg_probs(*f64(hidden, weight, bias))
    assert rel_err(scores.gather(1, indices), expected) < TOL[hidden.dtype]
    assert all(len(set(row)) == k for row in indices.tolist())
    if offsets is not None:
        assert not ref.exclusion_mask(offsets, ids, *scores.shape, "cpu").gather(1, indices).any()


@CASES
@given(catalogs())
def test_seed_avg_probs_property(case):
    hidden, weight, bias, _ = case
    out = C.seed_avg_probs(hidden, weight, bias)
    assert rel_err(out, ref.seed_avg_probs(*f64(hidden, weight, bias))) < TOL[hidden.dtype]
    assert torch.allclose(out.double().sum(1), torch.ones(out.shape[0], dtype=torch.float64), atol=1e-4)


@CASES
@given(catalogs(), st.data())
def test_seed_target_rank_property(case, data):
    hidden, weight, bias, gen = case
    batch, num_items = hidden.shape[0], weight.shape[0]
    targets = torch.randint(0, num_items, (batch,), generator=gen)
    offsets, ids = exclusions(data.draw, batch, num_items, 1) if data.draw(st.booleans()) else (None, None)
    ranks = C.seed_target_rank(hidden, weight, bias, targets, offsets, ids)
    expected = ref.seed_target_rank(*f64(hidden, weight, bias), targets, offsets, ids)
    scores = ref.seed_avg_probs(*f64(hidden, weight, bias))
    target_scores = scores.gather(1, targets[:, None])
    near = ((scores - target_scores).abs() <= 1e-5 * target_scores.abs()).sum(1) - 1
    assert ((ranks - expected).abs() <= near).all()
    assert ((ranks >= 0) & (ranks < num_items)).all()


@CASES
@given(catalogs(seeded=False))
def test_catalog_xent_property(case):
    hidden, weight, bias, gen = case
    targets = torch.randint(0, weight.shape[0], (hidden.shape[0],), generator=gen)
    loss, lse = C.catalog_xent(hidden, weight, bias, targets)
    exp_loss, exp_lse = ref.catalog_xent(*f64(hidden, weight, bias), targets)
    h, w = hidden.double().abs(), weight.double().abs()
    # Rounding of a float32 dot product scales with sum |h_i w_i|, not with its (cancelling) value.
    logit_scale = (h.sum(1).max() * w.max()).item() + (0.0 if bias is None else bias.double().abs().max().item())
    tol = TOL[hidden.dtype]
    assert (lse.double() - exp_lse).abs().max() <= tol * (exp_lse.abs().max().item() + logit_scale)
    assert (loss.double() - exp_loss).abs().max() <= tol * (exp_lse.abs().max().item() + logit_scale)
    grad_loss = torch.rand(hidden.shape[0], generator=gen, dtype=torch.float64).to(lse.dtype)
    grads = C.catalog_xent_backward(grad_loss, hidden, weight, bias, targets, lse)
    expected = ref.catalog_xent_backward(grad_loss.double(), *f64(hidden, weight, bias), targets, exp_lse)
    grad_tol = 1e-2 if hidden.dtype == torch.bfloat16 else 1e-4
    # Scales of each gradient: |W| for hidden, |h| for weight, 1 for bias (grad_loss <= 1).
    for got, want, scale in zip(grads, expected, (w.max().item(), h.max().item(), 1.0)):
        assert not torch.isnan(got).any()
        assert (got.double() - want).abs().max() <= grad_tol * (want.abs().max().item() + scale)


@CASES
@given(
    st.integers(1, 5), st.integers(1, 12), st.integers(1, 40), st.integers(1, 10_000), DTYPES,
    st.booleans(), st.booleans(), st.data(),
)
def test_denoiser_input_property(batch, length, dim, num_steps, dtype, add_position, add_step, data):
    from diffrec_ext.schedules import NoiseSchedule

    k = data.draw(st.integers(0, length))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    schedule = NoiseSchedule.create(data.draw(st.sampled_from(["sqrt", "cosine", "linear"])), num_steps)
    sa, so = schedule.noising_tables(dtype=torch.float64)
    item = torch.randn(batch, length, dim, generator=gen).to(dtype)
    pos = torch.randn(length, dim, generator=gen).to(dtype)
    steps = torch.randint(0, num_steps + 1, (batch,), generator=gen)
    noise = torch.randn(batch, k, dim, generator=gen).to(dtype)
    lengths = torch.randint(0, length + 1, (batch,), generator=gen)
    mask = torch.arange(length)[None, :] < (length - lengths)[:, None]
    out = C.denoiser_input(item, pos, steps, sa, so, noise, mask, k, add_position, add_step)
    expected = ref.denoiser_input(*f64(item, pos), steps, sa, so, noise.double(), mask, k, add_position, add_step)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    assert rel_err(out, expected) < tol
    grad = torch.randn(batch, length, dim, generator=gen).to(dtype)
    got = C.denoiser_input_backward(grad, steps, sa, mask, k, add_position)
    want = ref.denoiser_input_backward(grad.double(), steps, sa, mask, k, add_position)
    for g, w in zip(got, want):
        assert rel_err(g, w) < tol * max(1, batch)
