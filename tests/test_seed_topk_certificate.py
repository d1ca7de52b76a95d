"""seed_topk's one pass with a certificate (CPU): exact against the float64 twin, including the
ties and near-ties that must send users to the second pass; bf16/fp16 inputs; non-finite inputs
refused by every seed op with the message the CUDA kernels share.

`diffrec_ext._C.seed_topk_counts()` tells how many users of the last call the certificate
answered, so each case below also checks which path it exercised (a test of the fallback that
never falls back would prove nothing).
"""

import math

import pytest
import torch

from diffrec_ext import ops
from diffrec_ext import reference as ref

pytestmark = pytest.mark.skipif(not ops.HAVE_EXTENSION, reason="compiled extension not built")
C = torch.ops.diffrec_ext
if ops.HAVE_EXTENSION:
    from diffrec_ext import _C

# k above this runs the two passes (csrc/cpu/seed_scores.cpp, kMaxCertifiedK)
MAX_CERTIFIED_K = 256


def f64(*tensors):
    return [t.double() if t is not None else None for t in tensors]


def correlated_case(batch, seeds, dim, num_items, spread=0.5, scale=1.0, dtype=torch.float32, seed=0):
    """Seeds drawn around one vector per user (as Alg. 3's seeds of one history): the case the
    certificate is for."""
    gen = torch.Generator().manual_seed(seed)
    centre = torch.randn(batch, 1, dim, generator=gen)
    hidden = (centre * math.sqrt(1 - spread**2) + spread * torch.randn(batch, seeds, dim, generator=gen)) * scale
    weight = torch.randn(num_items, dim, generator=gen) / math.sqrt(dim)
    bias = torch.randn(num_items, generator=gen) * 0.1
    return hidden.to(dtype), weight.to(dtype), bias.to(dtype)


def counts():
    return _C.seed_topk_counts()


def assert_matches_twin(values, ids, hidden, weight, bias, k, offsets=None, excluded=None, tol=1e-5):
    """Values within tol of the float64 twin; each id carries its value; no duplicates, no
    excluded id, sorted. Ids equal to the twin's wherever the twin's scores are not within tol
    of a tie (a float32 kernel may order such near-ties differently)."""
    want_values, want_ids = ref.seed_topk(*f64(hidden, weight, bias), k, offsets, excluded)
    scale = want_values.abs().max()
    assert not torch.isnan(values).any()
    assert ((values.double() - want_values).abs().max() / scale) < tol
    scores = ref.seed_avg_probs(*f64(hidden, weight, bias))
    assert ((scores.gather(1, ids) - want_values).abs().max() / scale) < tol
    assert all(len(set(row)) == k for row in ids.tolist())
    if offsets is not None:
        mask = ref.exclusion_mask(offsets, excluded, *scores.shape, scores.device)
        assert not mask.gather(1, ids).any()
    assert (values[:, :-1] >= values[:, 1:]).all()
    # Where the twin's k + 1 best are separated by more than tol, the ids must agree exactly.
    masked = scores.masked_fill(ref.exclusion_mask(offsets, excluded, *scores.shape, scores.device), -1.0)
    top = torch.sort(masked, dim=1, descending=True).values[:, : k + 1]
    clear = ((top[:, :-1] - top[:, 1:]) / scale > tol).all(dim=1)
    assert torch.equal(ids[clear], want_ids[clear])


@pytest.mark.parametrize("batch,seeds,dim,num_items,k", [
    (64, 8, 16, 20011, 20),  # several tiles of logits (B * S = 512 rows: tiles of 4096 items)
    (3, 10, 32, 4099, 1),
    (5, 2, 33, 1000, 64),
    (2, 1, 8, 300, 7),  # one seed
])
@pytest.mark.parametrize("exclude", [False, True])
def test_certified_path_matches_twin_and_the_two_pass_kernel(batch, seeds, dim, num_items, k, exclude):
    hidden, weight, bias = correlated_case(batch, seeds, dim, num_items, seed=batch + k)
    offsets = excluded = None
    if exclude:
        gen = torch.Generator().manual_seed(1)
        offsets, excluded = ops.exclusion_csr(
            [torch.randint(0, num_items, (int(torch.randint(0, 40, (1,), generator=gen)),), generator=gen).tolist()
             for _ in range(batch)])
    values, ids = C.seed_topk(hidden, weight, bias, k, offsets, excluded)
    got = counts()
    assert got["users"] == batch and got["certified"] + got["exact_pass"] == batch
    assert got["certified"] > batch // 2, got  # the certificate really answered here
    assert_matches_twin(values, ids, hidden, weight, bias, k, offsets, excluded)
    # The two-pass kernel (k above the certified range), cut to k: the same ranking.
    wide = min(num_items - 40, MAX_CERTIFIED_K + 1)
    if wide > MAX_CERTIFIED_K:
        two_values, two_ids = C.seed_topk(hidden, weight, bias, wide, offsets, excluded)
        assert counts()["certified"] == 0
        assert torch.equal(ids, two_ids[:, :k])
        torch.testing.assert_close(values, two_values[:, :k], rtol=1e-6, atol=0)


def test_all_equal_scores_fall_back_and_keep_the_smallest_ids():
    """Every item ties with the bound: nothing can be certified, ties go to the smaller ids."""
    hidden = torch.randn(4, 3, 8)
    weight = torch.zeros(5000, 8)
    values, ids = C.seed_topk(hidden, weight, None, 10, None, None)
    assert counts() == {"users": 4, "certified": 0, "exact_pass": 4}
    assert ids.tolist() == [list(range(10))] * 4
    torch.testing.assert_close(values, torch.full((4, 10), 1 / 5000))


def integer_tie_case(num_items=3000, patterns=40, seeds=3, dim=8, batch=6, seed=3):
    """Weight rows from a few integer patterns, integer hidden: logits are small integers, exact
    whatever the summation order, so items of one pattern tie exactly, in large groups spread
    over the catalog."""
    gen = torch.Generator().manual_seed(seed)
    table = torch.randint(-1, 2, (patterns, dim), generator=gen).float()
    weight = table[torch.randint(0, patterns, (num_items,), generator=gen)]
    hidden = torch.randint(-2, 3, (batch, seeds, dim), generator=gen).float()
    return hidden, weight


@pytest.mark.parametrize("k", [1, 20, 75, 200])
def test_exact_ties_at_the_kth_place_match_the_twin_ids(k):
    hidden, weight = integer_tie_case()
    values, ids = C.seed_topk(hidden, weight, None, k, None, None)
    want_values, want_ids = ref.seed_topk(*f64(hidden, weight), None, k)
    assert torch.equal(ids, want_ids)  # ties among whole groups: the smaller ids, exactly
    torch.testing.assert_close(values.double(), want_values, rtol=1e-5, atol=0)


def test_ties_at_the_kth_place_force_the_second_pass():
    """One user whose k-th item ties with items beyond every seed's kept logits: the bound equals
    the k-th score, so the certificate must refuse and the second pass pick the smaller ids."""
    dim, num_items, k = 4, 4000, 3
    weight = torch.zeros(num_items, dim)
    weight[[3999, 10, 2500], 0] = 1.0  # three items above the rest, out of id order
    hidden = torch.zeros(1, 2, dim)
    hidden[0, :, 0] = 2.0
    # k = 3 takes the three raised items; k = 4 ties the fourth place among 3997 items at 0.
    values, ids = C.seed_topk(hidden, weight, None, k + 1, None, None)
    assert counts()["exact_pass"] == 1
    assert ids.tolist() == [[10, 2500, 3999, 0]]
    values, ids = C.seed_topk(hidden, weight, None, k, None, None)
    assert counts()["certified"] == 1
    assert ids.tolist() == [[10, 2500, 3999]]


def test_independent_flat_seeds_fall_back_and_stay_exact():
    """Independent seeds with nearly flat softmaxes: the bound (1/S) sum_s exp(tau_s - lse_s)
    stays above the k-th score, so most users take the second pass."""
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(8, 10, 16, generator=gen)
    weight = torch.randn(20000, 16, generator=gen) / 4
    values, ids = C.seed_topk(hidden, weight, None, 20, None, None)
    assert counts()["exact_pass"] > 0
    assert_matches_twin(values, ids, hidden, weight, None, 20)


@pytest.mark.parametrize("k", [MAX_CERTIFIED_K, 299, 300])
def test_k_close_to_the_catalog(k):
    hidden, weight, bias = correlated_case(3, 4, 8, 300, seed=k)
    values, ids = C.seed_topk(hidden, weight, bias, k, None, None)
    # k' = 4k >= V: no seed's heap fills, every item is a candidate and certified (k <= 256).
    assert counts()["certified"] == (3 if k <= MAX_CERTIFIED_K else 0)
    assert_matches_twin(values, ids, hidden, weight, bias, k)


def test_exclusions_covering_most_candidates():
    """Each user excludes its 150 best items and every seed's 150 largest logits: the kept
    logits and the answer both come from what is left."""
    hidden, weight, bias = correlated_case(6, 5, 16, 6000, seed=9)
    scores = ref.seed_avg_probs(*f64(hidden, weight, bias))
    logits = torch.einsum("bsd,vd->bsv", hidden, weight) + bias
    lists = [set(scores[b].topk(150).indices.tolist()) | set(logits[b].topk(150, dim=-1).indices.flatten().tolist())
             for b in range(6)]
    offsets, excluded = ops.exclusion_csr([sorted(ids) for ids in lists])
    values, ids = C.seed_topk(hidden, weight, bias, 20, offsets, excluded)
    assert counts()["certified"] > 0
    assert_matches_twin(values, ids, hidden, weight, bias, 20, offsets, excluded)
    # All but k items excluded: the k left, whatever the scores.
    keep = [list(range(b, 6000, 300))[:20] for b in range(6)]
    offsets, excluded = ops.exclusion_csr([sorted(set(range(6000)) - set(ids_b)) for ids_b in keep])
    values, ids = C.seed_topk(hidden, weight, bias, 20, offsets, excluded)
    assert [sorted(row) for row in ids.tolist()] == keep
    assert_matches_twin(values, ids, hidden, weight, bias, 20, offsets, excluded)


def test_a_given_lse_keeps_the_single_exact_pass():
    hidden, weight, bias = correlated_case(4, 3, 8, 2000, seed=2)
    lse = torch.logsumexp(torch.einsum("bsd,vd->bsv", hidden, weight) + bias, -1)
    values, ids = C.seed_topk(hidden, weight, bias, 10, None, None, lse)
    assert counts() == {"users": 4, "certified": 0, "exact_pass": 4}
    assert_matches_twin(values, ids, hidden, weight, bias, 10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_match_the_twin(dtype):
    """bf16/fp16 inputs are widened exactly to float32 and accumulated in float32: against the
    twin on the same (rounded) inputs in float64 the error is float32's, 1e-5, not the 1e-2 of a
    computation done in the low precision."""
    hidden, weight, bias = correlated_case(16, 6, 24, 9001, dtype=dtype, seed=4)
    values, ids = C.seed_topk(hidden, weight, bias, 20, None, None)
    assert values.dtype == torch.float32
    assert counts()["certified"] > 0
    assert_matches_twin(values, ids, hidden, weight, bias, 20)


# ----------------------------------------------------------------------------- non-finite inputs


def seed_op_calls(hidden, weight, bias, lse):
    targets = torch.zeros(hidden.shape[0], dtype=torch.int64)
    return {
        "seed_avg_probs": lambda: C.seed_avg_probs(hidden, weight, bias, lse),
        "seed_topk": lambda: C.seed_topk(hidden, weight, bias, 3, None, None, lse),
        "seed_target_rank": lambda: C.seed_target_rank(hidden, weight, bias, targets, None, None, lse),
    }


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("argument", ["hidden", "weight", "bias", "lse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_non_finite_inputs_are_refused_by_name(argument, bad, dtype):
    hidden, weight, bias = correlated_case(2, 3, 8, 500, dtype=dtype)
    lse = torch.logsumexp(torch.einsum("bsd,vd->bsv", hidden.double(), weight.double()) + bias.double(), -1)
    lse = lse.to(torch.float64 if dtype == torch.float64 else torch.float32)
    inputs = {"hidden": hidden, "weight": weight, "bias": bias, "lse": lse}
    target = inputs[argument].clone()
    target.view(-1)[target.numel() // 2] = bad
    inputs[argument] = target
    for op, call in seed_op_calls(**inputs).items():
        with pytest.raises(RuntimeError, match=rf"^{op}: {argument} contains a non-finite value \(nan or inf\)"):
            call()


def test_finite_inputs_whose_logits_overflow_are_refused():
    hidden = torch.full((1, 2, 4), 1e20)
    weight = torch.full((300, 4), 1e20)
    with pytest.raises(RuntimeError, match="seed_topk: the log-sum-exp of hidden @ weight.T \\+ bias overflows"):
        C.seed_topk(hidden, weight, None, 3, None, None)


# ----------------------------------------------------------------------------- autograd and fake kernels


def test_opcheck_on_certified_and_fallback_calls():
    hidden, weight, bias = correlated_case(5, 4, 8, 700, seed=6)
    grad = lambda t: t.clone().requires_grad_(True)  # noqa: E731
    torch.library.opcheck(C.seed_topk, (grad(hidden), grad(weight), grad(bias), 5, None, None))
    assert counts()["certified"] > 0
    flat = torch.zeros(700, 8)
    torch.library.opcheck(C.seed_topk, (grad(hidden), grad(flat), None, 5, None, None))
    assert counts()["exact_pass"] == 5


def test_gradients_of_certified_values_match_the_twin():
    hidden, weight, bias = correlated_case(4, 3, 8, 900, seed=8)
    hidden, weight, bias = [t.double().requires_grad_(True) for t in (hidden, weight, bias)]
    values, _ = ops.seed_topk(hidden, weight, bias, 6)
    assert counts()["certified"] == 4
    values.sum().backward()
    grads = [t.grad.clone() for t in (hidden, weight, bias)]
    for t in (hidden, weight, bias):
        t.grad = None
    ref.seed_topk(hidden, weight, bias, 6)[0].sum().backward()
    for ours, theirs in zip(grads, (hidden.grad, weight.grad, bias.grad)):
        torch.testing.assert_close(ours, theirs)
