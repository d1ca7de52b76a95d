"""CUDA kernels against their PyTorch twins (diffrec_ext.reference) computed in float64.

Error metric: max|out - ref| / max|ref|, under 1e-5 for float32 and 1e-2 for bfloat16/float16;
NaN never passes. Fresh random inputs each test, odd sizes, outputs poisoned with NaN before the
kernels run. Skipped without a GPU or without the CUDA build of the extension.
"""

from __future__ import annotations

import pytest
import torch

import diffrec_ext.ops as ops
from diffrec_ext import reference

HAVE_CUDA_OPS = torch.cuda.is_available() and ops.HAVE_EXTENSION and ops.BUILD_INFO["with_cuda"]
pytestmark = pytest.mark.skipif(
    not HAVE_CUDA_OPS, reason="needs a CUDA GPU and diffrec_ext built with CUDA"
)

DEVICE = "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float64: 1e-12}
NUM_STEPS = 1000  # N: steps in [0, N], angles n * w_j up to 1e3 rad


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any(), "output holds NaN"
    assert torch.isfinite(ref).all(), "reference is not finite"
    scale = ref.abs().max().item()
    diff = (out - ref).abs().max().item()
    return diff / scale if scale > 0 else diff


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    error = relative_error(out, ref)
    assert error < TOLERANCE[dtype], f"{what}: max|out-ref|/max|ref| = {error:.3g} >= {TOLERANCE[dtype]}"


def poison_allocator() -> None:
    """Leaves NaN in free blocks of the caching allocator (small and large pools), so an output
    element a kernel forgets to write reads as NaN (or as a wild id for int64 outputs)."""
    blocks = [torch.full((n,), float("nan"), device=DEVICE) for n in (1 << 16, 1 << 18, 1 << 22, 1 << 24)]
    del blocks


def exclusion_lists(batch: int, num_items: int, max_len: int, generator: torch.Generator):
    """Random CSR exclusion lists with duplicates and some empty users."""
    lists = []
    for user in range(batch):
        length = 0 if user % 3 == 1 else int(torch.randint(1, max_len + 1, (1,), generator=generator))
        ids = torch.randint(0, num_items, (length,), generator=generator)
        if length > 1:
            ids[-1] = ids[0]  # a duplicate
        lists.append(ids.tolist())
    return ops.exclusion_csr(lists, device=DEVICE)


def f64(*tensors):
    return [t.double() if t is not None and t.is_floating_point() else t for t in tensors]


# ---------------------------------------------------------------- denoiser_input

# (B, T, d, K, padding, add_position, add_step)
DENOISER_CASES = [
    (4, 50, 256, 1, True, True, True),
    (1, 1, 8, 1, False, True, True),
    (3, 7, 37, 7, True, False, True),  # odd d: scalar path; every position noised
    (2, 5, 64, 0, True, True, False),  # nothing noised
    (5, 3, 1030, 2, True, True, True),  # d over one block's columns
    (33, 11, 24, 3, True, True, True),  # several backward batch groups
]


def denoiser_inputs(batch, length, dim, noised, padding, dtype, schedule_dtype=torch.float64):
    item = torch.randn(batch, length, dim, device=DEVICE).to(dtype)
    pos = torch.randn(length, dim, device=DEVICE).to(dtype)
    steps = torch.randint(0, NUM_STEPS + 1, (batch,), device=DEVICE)
    steps[0] = NUM_STEPS
    sqrt_abar = torch.rand(NUM_STEPS + 1, device=DEVICE, dtype=torch.float64).to(schedule_dtype)
    sqrt_one_minus = (1 - sqrt_abar.double() ** 2).sqrt().to(schedule_dtype)
    noise = torch.randn(batch, noised, dim, device=DEVICE).to(dtype)
    mask = torch.rand(batch, length, device=DEVICE) < 0.3 if padding else None
    return item, pos, steps, sqrt_abar, sqrt_one_minus, noise, mask


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", DENOISER_CASES)
def test_denoiser_input_matches_reference(case, dtype):
    batch, length, dim, noised, padding, add_position, add_step = case
    args = denoiser_inputs(batch, length, dim, noised, padding, dtype)
    poison_allocator()
    out = torch.ops.diffrec_ext.denoiser_input(*args, noised, add_position, add_step)
    ref = reference.denoiser_input(*f64(*args), noised, add_position, add_step)
    assert out.dtype == dtype
    assert_close(out, ref, dtype, "denoiser_input")
    if padding:
        assert (out[args[-1]] == 0).all(), "padding positions must be exactly zero"


@pytest.mark.parametrize("dtype", DTYPES)
def test_denoiser_input_misaligned_and_float32_schedule(dtype):
    batch, length, dim, noised = 3, 6, 64, 2
    item, pos, steps, sqrt_abar, sqrt_one_minus, noise, mask = denoiser_inputs(
        batch, length, dim, noised, True, dtype, schedule_dtype=torch.float32
    )
    # A contiguous view that starts one element into its storage: no 16-byte vectors possible.
    shifted = torch.empty(item.numel() + 1, device=DEVICE, dtype=dtype)[1:].view_as(item)
    shifted.copy_(item)
    args = (shifted, pos, steps, sqrt_abar, sqrt_one_minus, noise, mask)
    out = torch.ops.diffrec_ext.denoiser_input(*args, noised, True, True)
    ref = reference.denoiser_input(*f64(*args), noised, True, True)
    assert_close(out, ref, dtype, "denoiser_input (misaligned)")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", DENOISER_CASES)
def test_denoiser_input_backward_matches_reference(case, dtype):
    batch, length, dim, noised, padding, add_position, _ = case
    _, _, steps, sqrt_abar, _, _, mask = denoiser_inputs(batch, length, dim, noised, padding, dtype)
    grad_out = torch.randn(batch, length, dim, device=DEVICE).to(dtype)
    poison_allocator()
    grad_item, grad_pos = torch.ops.diffrec_ext.denoiser_input_backward(
        grad_out, steps, sqrt_abar, mask, noised, add_position
    )
    ref_item, ref_pos = reference.denoiser_input_backward(
        grad_out.double(), steps, sqrt_abar, mask, noised, add_position
    )
    assert grad_item.dtype == dtype and grad_pos.dtype == dtype
    assert_close(grad_item, ref_item, dtype, "grad_item")
    if add_position:
        assert_close(grad_pos, ref_pos, dtype, "grad_pos")
        again = torch.ops.diffrec_ext.denoiser_input_backward(
            grad_out, steps, sqrt_abar, mask, noised, add_position
        )[1]
        assert torch.equal(grad_pos, again), "grad_pos must be deterministic"
    else:
        assert (grad_pos == 0).all()


def test_denoiser_input_autograd_matches_reference():
    args = list(denoiser_inputs(4, 9, 48, 2, True, torch.float32))
    args[0].requires_grad_(True)
    args[1].requires_grad_(True)
    out = ops.denoiser_input(*args, noised_positions=2)
    grad = torch.randn_like(out)
    out.backward(grad)
    item64 = args[0].detach().double().requires_grad_(True)
    pos64 = args[1].detach().double().requires_grad_(True)
    ref = reference.denoiser_input(item64, pos64, *f64(*args[2:]), 2, True, True)
    ref.backward(grad.double())
    assert_close(args[0].grad, item64.grad, torch.float32, "item_emb.grad")
    assert_close(args[1].grad, pos64.grad, torch.float32, "pos_emb.grad")


def test_denoiser_input_cuda_graph_capture():
    batch, length, dim, noised = 8, 12, 64, 1
    static = list(denoiser_inputs(batch, length, dim, noised, True, torch.float32))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as CUDA graphs require
        torch.ops.diffrec_ext.denoiser_input(*static, noised, True, True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # the steps range check must not read back to the host here
        captured = torch.ops.diffrec_ext.denoiser_input(*static, noised, True, True)
    fresh = denoiser_inputs(batch, length, dim, noised, True, torch.float32)
    for target, source in zip(static, fresh):
        target.copy_(source)
    graph.replay()
    torch.cuda.synchronize()
    eager = torch.ops.diffrec_ext.denoiser_input(*fresh, noised, True, True)
    assert torch.equal(captured, eager)


# ---------------------------------------------------------------- seed-averaged scores


def seed_inputs(batch, seeds, dim, num_items, dtype, with_bias=True, duplicate_half=False):
    hidden = torch.randn(batch, seeds, dim, device=DEVICE)
    weight = torch.randn(num_items, dim, device=DEVICE) / dim**0.25
    bias = torch.randn(num_items, device=DEVICE) if with_bias else None
    if duplicate_half:  # item i + V/2 equals item i: exact ties
        half = num_items // 2
        weight[half : 2 * half] = weight[:half]
        if bias is not None:
            bias[half : 2 * half] = bias[:half]
    return hidden.to(dtype), weight.to(dtype), (bias.to(dtype) if bias is not None else None)


# (B, S, d, V, bias)
AVG_CASES = [(3, 4, 32, 1000, True), (1, 1, 16, 300007, False), (2, 10, 64, 70001, True)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", AVG_CASES)
def test_seed_avg_probs_matches_reference(case, dtype):
    batch, seeds, dim, num_items, with_bias = case
    hidden, weight, bias = seed_inputs(batch, seeds, dim, num_items, dtype, with_bias)
    poison_allocator()
    out = torch.ops.diffrec_ext.seed_avg_probs(hidden, weight, bias)
    ref = reference.seed_avg_probs(*f64(hidden, weight, bias))
    assert out.dtype == torch.float32
    assert_close(out, ref, dtype, "seed_avg_probs")


def check_topk(values, ids, hidden, weight, bias, k, offsets, excl_ids, dtype, lse=None):
    """Values close to the reference; ids equal to the reference's except where the reference
    scores tie within rounding; no excluded item."""
    h, w, b = f64(hidden, weight, bias)
    lse64 = lse.double() if lse is not None else None
    ref_values, ref_ids = reference.seed_topk(h, w, b, k, offsets, excl_ids, lse64)
    scores = reference.seed_avg_probs(h, w, b, lse64)
    mask = reference.exclusion_mask(offsets, excl_ids, scores.shape[0], scores.shape[1], scores.device)
    scores = scores.masked_fill(mask, float("-inf"))
    assert values.dtype == torch.float32 and ids.dtype == torch.int64
    assert values.shape == ref_values.shape and ids.shape == ref_ids.shape
    assert ((ids >= 0) & (ids < weight.shape[0])).all(), "ids out of range (unwritten output?)"
    assert all(len(set(row.tolist())) == k for row in ids), "an id appears twice in a row"
    assert not mask.gather(1, ids).any(), "an excluded item was returned"
    assert_close(values, ref_values, dtype, "top-k values")
    score_of_ours = scores.gather(1, ids)
    assert_close(values, score_of_ours, dtype, "top-k value vs its id's score")
    tie = (score_of_ours - ref_values).abs() <= TOLERANCE[dtype] * ref_values.abs().max()
    assert ((ids == ref_ids) | tie).all(), "an id differs from the reference where scores do not tie"


# (B, S, d, V, k, with exclusion); a user excludes at most 40 items, so k <= V - 40 with exclusion
TOPK_CASES = [
    (4, 3, 32, 5000, 1, False),
    (4, 3, 32, 5000, 20, True),
    (2, 10, 64, 300007, 20, True),  # several catalog tiles
    (3, 2, 16, 777, 777, False),  # k = V
    (3, 2, 16, 777, 737, True),  # k = V - 40
    (1, 1, 8, 100, 100, False),
    (5, 2, 16, 4000, 1024, True),  # largest k merged in shared memory
    (3, 4, 16, 4001, 1500, True),  # k above it: the sorted path
    (2, 3, 16, 2500, 2500, False),  # k = V on the sorted path
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", TOPK_CASES)
def test_seed_topk_matches_reference(case, dtype):
    batch, seeds, dim, num_items, k, with_exclusion = case
    generator = torch.Generator().manual_seed(batch * 1000 + k)
    hidden, weight, bias = seed_inputs(batch, seeds, dim, num_items, dtype)
    offsets, excl_ids = exclusion_lists(batch, num_items, 40, generator) if with_exclusion else (None, None)
    poison_allocator()
    values, ids = torch.ops.diffrec_ext.seed_topk(hidden, weight, bias, k, offsets, excl_ids)
    check_topk(values, ids, hidden, weight, bias, k, offsets, excl_ids, dtype)


@pytest.mark.parametrize("k", [10, 1100])
def test_seed_topk_exact_ties_prefer_smaller_ids(k):
    num_items = 3000
    half = num_items // 2
    hidden, weight, bias = seed_inputs(3, 4, 32, num_items, torch.float32, duplicate_half=True)
    values, ids = torch.ops.diffrec_ext.seed_topk(hidden, weight, bias, k, None, None)
    check_topk(values, ids, hidden, weight, bias, k, None, None, torch.float32)
    # Item v + half has bit-identical logits to v: wherever it is listed, v comes right before.
    for row_values, row_ids in zip(values.tolist(), ids.tolist()):
        place = {item: i for i, item in enumerate(row_ids)}
        for item, i in place.items():
            if item >= half:
                assert place.get(item - half) == i - 1, f"twin of {item} not right before it"
                assert row_values[i - 1] == row_values[i]


def test_seed_topk_float64_matches_reference():
    hidden, weight, bias = seed_inputs(3, 5, 24, 9001, torch.float64)
    offsets, excl_ids = exclusion_lists(3, 9001, 30, torch.Generator().manual_seed(7))
    values, ids = torch.ops.diffrec_ext.seed_topk(hidden, weight, bias, 50, offsets, excl_ids)
    ref_values, ref_ids = reference.seed_topk(hidden, weight, bias, 50, offsets, excl_ids)
    assert values.dtype == torch.float64
    assert torch.equal(ids, ref_ids)
    assert_close(values, ref_values, torch.float64, "float64 top-k values")


def check_rank(rank, hidden, weight, bias, targets, offsets, excl_ids, dtype, lse=None):
    """Equal to the reference rank, up to the items whose reference score ties the target's
    within rounding."""
    h, w, b = f64(hidden, weight, bias)
    lse64 = lse.double() if lse is not None else None
    ref = reference.seed_target_rank(h, w, b, targets, offsets, excl_ids, lse64)
    scores = reference.seed_avg_probs(h, w, b, lse64)
    target_score = scores.gather(1, targets[:, None])
    near = ((scores - target_score).abs() <= TOLERANCE[dtype] * scores.max(dim=1, keepdim=True).values)
    near_count = near.sum(dim=1) - 1  # the target itself
    assert rank.dtype == torch.int64 and rank.shape == ref.shape
    assert ((rank - ref).abs() <= near_count).all(), f"rank {rank.tolist()} vs reference {ref.tolist()}"


# (B, S, d, V, with exclusion)
RANK_CASES = [(5, 3, 32, 1000, False), (4, 10, 64, 300007, True), (1, 1, 8, 7, True)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", RANK_CASES)
def test_seed_target_rank_matches_reference(case, dtype):
    batch, seeds, dim, num_items, with_exclusion = case
    generator = torch.Generator().manual_seed(num_items)
    hidden, weight, bias = seed_inputs(batch, seeds, dim, num_items, dtype)
    targets = torch.randint(0, num_items, (batch,), device=DEVICE)
    offsets, excl_ids = exclusion_lists(batch, num_items, 20, generator) if with_exclusion else (None, None)
    rank = torch.ops.diffrec_ext.seed_target_rank(hidden, weight, bias, targets, offsets, excl_ids)
    check_rank(rank, hidden, weight, bias, targets, offsets, excl_ids, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_seed_target_rank_counts_exact_ties_against_the_target(dtype):
    num_items = 4000
    half = num_items // 2
    hidden, weight, bias = seed_inputs(4, 3, 32, num_items, dtype, duplicate_half=True)
    # Each target has a twin of bit-identical logits (in either half), which counts against it:
    # excluding the twin lowers the rank by exactly one.
    targets = torch.tensor([5, 2100, 1999, 3999], device=DEVICE)
    twins = torch.where(targets < half, targets + half, targets - half)
    offsets, twin_ids = ops.exclusion_csr([[t] for t in twins.tolist()], device=DEVICE)
    rank = torch.ops.diffrec_ext.seed_target_rank(hidden, weight, bias, targets, None, None)
    without_twin = torch.ops.diffrec_ext.seed_target_rank(hidden, weight, bias, targets, offsets, twin_ids)
    assert torch.equal(rank, without_twin + 1)
    check_rank(rank, hidden, weight, bias, targets, None, None, dtype)


# ---------------------------------------------------------------- catalog cross-entropy

# (B, d, V, bias)
XENT_CASES = [(1, 8, 100, True), (5, 32, 1000, False), (64, 64, 70001, True), (33, 64, 300007, True)]


def xent_inputs(batch, dim, num_items, dtype, with_bias):
    hidden = torch.randn(batch, dim, device=DEVICE).to(dtype)
    weight = (torch.randn(num_items, dim, device=DEVICE) / dim**0.25).to(dtype)
    bias = torch.randn(num_items, device=DEVICE).to(dtype) if with_bias else None
    targets = torch.randint(0, num_items, (batch,), device=DEVICE)
    return hidden, weight, bias, targets


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", XENT_CASES)
def test_catalog_xent_matches_reference(case, dtype):
    hidden, weight, bias, targets = xent_inputs(*case[:3], dtype, case[3])
    poison_allocator()
    loss, lse = torch.ops.diffrec_ext.catalog_xent(hidden, weight, bias, targets)
    ref_loss, ref_lse = reference.catalog_xent(*f64(hidden, weight, bias), targets)
    assert loss.dtype == torch.float32 and lse.dtype == torch.float32
    assert_close(loss, ref_loss, dtype, "loss")
    assert_close(lse, ref_lse, dtype, "lse")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", XENT_CASES)
def test_catalog_xent_backward_matches_reference(case, dtype):
    hidden, weight, bias, targets = xent_inputs(*case[:3], dtype, case[3])
    grad_loss = torch.randn(hidden.shape[0], device=DEVICE)
    _, lse = reference.catalog_xent(*f64(hidden, weight, bias), targets)
    poison_allocator()
    grads = torch.ops.diffrec_ext.catalog_xent_backward(grad_loss, hidden, weight, bias, targets, lse.float())
    refs = reference.catalog_xent_backward(grad_loss.double(), *f64(hidden, weight, bias), targets, lse)
    for grad, ref, name in zip(grads, refs, ("grad_hidden", "grad_weight", "grad_bias")):
        assert grad.dtype == dtype, name
        assert_close(grad, ref, dtype, name)


def test_catalog_xent_autograd():
    hidden, weight, bias, targets = xent_inputs(7, 16, 5000, torch.float32, True)
    for t in (hidden, weight, bias):
        t.requires_grad_(True)
    loss, _ = ops.catalog_xent(hidden, weight, bias, targets)
    loss.sum().backward()
    h, w, b = (t.detach().double().requires_grad_(True) for t in (hidden, weight, bias))
    logits = h @ w.T + b
    torch.nn.functional.cross_entropy(logits, targets, reduction="sum").backward()
    assert_close(hidden.grad, h.grad, torch.float32, "hidden.grad")
    assert_close(weight.grad, w.grad, torch.float32, "weight.grad")
    assert_close(bias.grad, b.grad, torch.float32, "bias.grad")


# ---------------------------------------------------------------- a catalog shard with the global lse


@pytest.mark.parametrize("dtype", DTYPES)
def test_seed_ops_on_a_shard_with_the_global_lse(dtype):
    batch, seeds, dim, num_items = 4, 3, 32, 9000
    hidden, weight, bias = seed_inputs(batch, seeds, dim, num_items, dtype)
    h, w, b = f64(hidden, weight, bias)
    lse = torch.logsumexp(torch.einsum("bsd,vd->bsv", h, w) + b, dim=-1).float()  # whole catalog
    begin, end = 3000, 7001  # the shard
    shard = (weight[begin:end], bias[begin:end])
    probs = torch.ops.diffrec_ext.seed_avg_probs(hidden, *shard, lse)
    ref = reference.seed_avg_probs(h, w[begin:end], b[begin:end], lse.double())
    assert_close(probs, ref, dtype, "seed_avg_probs on a shard")
    for k in (7, 1200):
        values, ids = torch.ops.diffrec_ext.seed_topk(hidden, *shard, k, None, None, lse)
        check_topk(values, ids, hidden, *shard, k, None, None, dtype, lse)
    targets = torch.randint(0, end - begin, (batch,), device=DEVICE)
    rank = torch.ops.diffrec_ext.seed_target_rank(hidden, *shard, targets, None, None, lse)
    check_rank(rank, hidden, *shard, targets, None, None, dtype, lse)


@pytest.mark.parametrize("dtype", DTYPES)
def test_catalog_xent_target_in_another_shard(dtype):
    hidden, weight, bias, targets = xent_inputs(6, 32, 40000, dtype, True)
    targets[1] = -1
    targets[4] = -1
    loss, lse = torch.ops.diffrec_ext.catalog_xent(hidden, weight, bias, targets)
    ref_loss, ref_lse = reference.catalog_xent(*f64(hidden, weight, bias), targets)
    assert_close(loss, ref_loss, dtype, "loss")
    assert torch.equal(loss[targets < 0], lse[targets < 0]), "absent target: loss = lse"
    grad_loss = torch.randn(6, device=DEVICE)
    grads = torch.ops.diffrec_ext.catalog_xent_backward(grad_loss, hidden, weight, bias, targets, lse)
    refs = reference.catalog_xent_backward(grad_loss.double(), *f64(hidden, weight, bias), targets, ref_lse)
    for grad, ref, name in zip(grads, refs, ("grad_hidden", "grad_weight", "grad_bias")):
        assert_close(grad, ref, dtype, name)


# ---------------------------------------------------------------- opcheck, errors


def opcheck_cases():
    hidden, weight, bias = seed_inputs(2, 3, 8, 50, torch.float32)
    targets = torch.tensor([3, 49], device=DEVICE)
    offsets, excl_ids = ops.exclusion_csr([[1, 2], [7]], device=DEVICE)
    item, pos, steps, sqrt_abar, sqrt_one_minus, noise, mask = denoiser_inputs(2, 4, 8, 1, True, torch.float32)
    xh, xw, xb, xt = xent_inputs(3, 8, 50, torch.float32, True)
    lib = torch.ops.diffrec_ext
    return {
        "denoiser_input": (lib.denoiser_input.default,
                           (item, pos, steps, sqrt_abar, sqrt_one_minus, noise, mask, 1, True, True)),
        "denoiser_input_backward": (lib.denoiser_input_backward.default,
                                    (torch.randn_like(item), steps, sqrt_abar, mask, 1, True)),
        "seed_avg_probs": (lib.seed_avg_probs.default, (hidden, weight, bias)),
        "seed_topk": (lib.seed_topk.default, (hidden, weight, bias, 5, offsets, excl_ids)),
        "seed_target_rank": (lib.seed_target_rank.default, (hidden, weight, bias, targets, offsets, excl_ids)),
        "catalog_xent": (lib.catalog_xent.default, (xh, xw, xb, xt)),
        "catalog_xent_backward": (lib.catalog_xent_backward.default,
                                  (torch.randn(3, device=DEVICE), xh, xw, xb, xt, torch.randn(3, device=DEVICE))),
    }


@pytest.mark.parametrize(
    "name",
    ["denoiser_input", "denoiser_input_backward", "seed_avg_probs", "seed_topk", "seed_target_rank",
     "catalog_xent", "catalog_xent_backward"],
)
def test_opcheck_cuda(name):
    """The CUDA kernels against the schemas and fake kernels (the autograd and compile checks are
    device-independent and run on the CPU in test_ops.py)."""
    op, args = opcheck_cases()[name]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def bad_calls(device):
    """Calls that the shared checks must reject, built on `device`."""
    hidden = torch.randn(2, 3, 8, device=device)
    weight = torch.randn(50, 8, device=device)
    lib = torch.ops.diffrec_ext
    item = torch.randn(2, 4, 8, device=device)
    pos = torch.randn(4, 8, device=device)
    schedule = torch.rand(11, device=device)
    noise = torch.randn(2, 1, 8, device=device)
    return {
        "steps out of range": lambda: lib.denoiser_input(
            item, pos, torch.tensor([3, 11], device=device), schedule, schedule, noise, None, 1, True, True),
        "pos_emb shape": lambda: lib.denoiser_input(
            item, pos[:3], torch.tensor([3, 1], device=device), schedule, schedule, noise, None, 1, True, True),
        "backward steps out of range": lambda: lib.denoiser_input_backward(
            item, torch.tensor([-1, 1], device=device), schedule, None, 1, True),
        "weight dim": lambda: lib.seed_avg_probs(hidden, weight[:, :5], None),
        "weight dtype": lambda: lib.seed_topk(hidden, weight.double(), None, 3, None, None),
        "empty batch": lambda: lib.seed_topk(hidden[:0], weight, None, 3, None, None),
        "k above items left": lambda: lib.seed_topk(
            hidden, weight, None, 49, torch.tensor([0, 3, 3], device=device),
            torch.tensor([1, 2, 1], device=device)),
        "lse shape": lambda: lib.seed_avg_probs(hidden, weight, None, torch.zeros(2, 2, device=device)),
        "offsets end": lambda: lib.seed_topk(
            hidden, weight, None, 3, torch.tensor([0, 1, 1], device=device), torch.tensor([4, 5], device=device)),
        "exclude id range": lambda: lib.seed_topk(
            hidden, weight, None, 3, torch.tensor([0, 1, 2], device=device), torch.tensor([4, 50], device=device)),
        "target range": lambda: lib.seed_target_rank(
            hidden, weight, None, torch.tensor([0, 50], device=device), None, None),
        "xent hidden rank": lambda: lib.catalog_xent(hidden, weight, None, torch.tensor([0, 1], device=device)),
    }


def first_line(error: Exception) -> str:
    return str(error).splitlines()[0]


@pytest.mark.parametrize("case", list(bad_calls("cpu")))
def test_cuda_and_cpu_reject_bad_input_alike(case):
    with pytest.raises(RuntimeError) as on_cpu:
        bad_calls("cpu")[case]()
    with pytest.raises(RuntimeError) as on_cuda:
        bad_calls(DEVICE)[case]()
    assert first_line(on_cuda.value) == first_line(on_cpu.value)


@pytest.mark.parametrize("k", [0, 51])
def test_seed_topk_rejects_k_out_of_range(k):
    hidden, weight, _ = seed_inputs(2, 3, 8, 50, torch.float32)
    for device in ("cpu", DEVICE):
        with pytest.raises(RuntimeError, match="k"):
            torch.ops.diffrec_ext.seed_topk(hidden.to(device), weight.to(device), None, k, None, None)


def test_mixed_devices_are_rejected():
    hidden, weight, _ = seed_inputs(2, 3, 8, 50, torch.float32)
    with pytest.raises(RuntimeError, match="weight is on cpu"):
        torch.ops.diffrec_ext.seed_topk(hidden, weight.cpu(), None, 3, None, None)
