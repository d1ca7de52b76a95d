"""CUDA edge cases of issue 14, against the float64 twins in diffrec_ext.reference: several catalog
tiles (DIFFREC_CUDA_TILE_MIB=1 makes tiles of 256 items), k above the tile width, several user
groups of the sorted top-k, a split log-sum-exp grid, exclusions under CUDA graph capture, the
device-side value checks (non-finite inputs, invalid ids, one host read per call), and 8 users at
the real shape (V = 1M, bf16). Skipped without a GPU or without the CUDA build of the extension.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import diffrec_ext.ops as ops
from diffrec_ext import reference
from test_cuda_ops import (
    DEVICE,
    assert_close,
    check_rank,
    check_topk,
    exclusion_lists,
    f64,
    poison_allocator,
    seed_inputs,
    xent_inputs,
)

HAVE_CUDA_OPS = torch.cuda.is_available() and ops.HAVE_EXTENSION and ops.BUILD_INFO["with_cuda"]
pytestmark = pytest.mark.skipif(not HAVE_CUDA_OPS, reason="needs a CUDA GPU and diffrec_ext built with CUDA")

lib = torch.ops.diffrec_ext


@pytest.fixture
def small_tiles(monkeypatch):
    """1 MiB of tile scratch: the catalog sweeps take many tiles (read on every call)."""
    monkeypatch.setenv("DIFFREC_CUDA_TILE_MIB", "1")


# ---------------------------------------------------------------- tiles, k, user groups


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_seed_topk_k_above_tile_width(small_tiles, dtype):
    # B * S + B = 2100 rows of 4 bytes per item: the running top-k sweeps tiles of 256 items,
    # so k = 1000 fills only over four tiles and every merge starts from a partial list.
    batch, seeds, dim, num_items, k = 100, 20, 16, 3001, 1000
    hidden, weight, bias = seed_inputs(batch, seeds, dim, num_items, dtype)
    offsets, excl_ids = exclusion_lists(batch, num_items, 6, torch.Generator().manual_seed(1))
    poison_allocator()
    values, ids = lib.seed_topk(hidden, weight, bias, k, offsets, excl_ids)
    check_topk(values, ids, hidden, weight, bias, k, offsets, excl_ids, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [20, 700])
def test_seed_topk_many_tiles(small_tiles, dtype, k):
    batch, seeds, dim, num_items = 6, 10, 24, 20011
    hidden, weight, bias = seed_inputs(batch, seeds, dim, num_items, dtype)
    offsets, excl_ids = exclusion_lists(batch, num_items, 40, torch.Generator().manual_seed(k))
    poison_allocator()
    values, ids = lib.seed_topk(hidden, weight, bias, k, offsets, excl_ids)
    check_topk(values, ids, hidden, weight, bias, k, offsets, excl_ids, dtype)


@pytest.mark.parametrize("with_lse", [False, True])
def test_seed_topk_sorted_path_several_user_groups(small_tiles, with_lse):
    # k > 1024: users go through a [group, V] buffer; 1 MiB / (V * 16 bytes) = 3 users a group,
    # so 7 users make groups of 3, 3 and 1.
    batch, seeds, dim, num_items, k = 7, 3, 16, 20011, 1500
    hidden, weight, bias = seed_inputs(batch, seeds, dim, num_items, torch.float32)
    offsets, excl_ids = exclusion_lists(batch, num_items, 40, torch.Generator().manual_seed(3))
    lse = None
    if with_lse:
        h, w, b = f64(hidden, weight, bias)
        lse = torch.logsumexp(torch.einsum("bsd,vd->bsv", h, w) + b, dim=-1).float()
    poison_allocator()
    values, ids = lib.seed_topk(hidden, weight, bias, k, offsets, excl_ids, lse)
    check_topk(values, ids, hidden, weight, bias, k, offsets, excl_ids, torch.float32, lse)


def test_seed_target_rank_and_avg_probs_many_tiles(small_tiles):
    batch, seeds, dim, num_items = 6, 10, 24, 20011
    hidden, weight, bias = seed_inputs(batch, seeds, dim, num_items, torch.float32)
    targets = torch.randint(0, num_items, (batch,), device=DEVICE)
    offsets, excl_ids = exclusion_lists(batch, num_items, 40, torch.Generator().manual_seed(5))
    rank = lib.seed_target_rank(hidden, weight, bias, targets, offsets, excl_ids)
    check_rank(rank, hidden, weight, bias, targets, offsets, excl_ids, torch.float32)
    poison_allocator()
    probs = lib.seed_avg_probs(hidden, weight, bias)
    assert_close(probs, reference.seed_avg_probs(*f64(hidden, weight, bias)), torch.float32, "seed_avg_probs")


@pytest.mark.parametrize("batch", [1, 5, 40, 300])
def test_catalog_xent_split_logsumexp_grid(batch):
    # Few rows: each catalog tile is cut along its columns over several blocks, whose partial
    # sums are merged per row (from 1 row to more rows than one block holds).
    hidden, weight, bias, targets = xent_inputs(batch, 32, 70001, torch.float32, True)
    targets[0] = -1
    poison_allocator()
    loss, lse = lib.catalog_xent(hidden, weight, bias, targets)
    ref_loss, ref_lse = reference.catalog_xent(*f64(hidden, weight, bias), targets)
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(lse, ref_lse, torch.float32, "lse")
    again, _ = lib.catalog_xent(hidden, weight, bias, targets)
    assert torch.equal(loss, again), "the split log-sum-exp must be deterministic"


# ---------------------------------------------------------------- seed_target_rank with a given lse


def capture(fn):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as CUDA graphs require
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out



def f64_lse(hidden, weight, bias):
    h, w, b = f64(hidden, weight, bias)
    logits = torch.einsum("bsd,vd->bsv", h, w)
    return torch.logsumexp(logits + b if b is not None else logits, dim=-1).float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_seed_target_rank_with_lse_is_one_sweep_and_counts_twins(small_tiles, dtype):
    # A given lse skips pass 1: the target's exact score comes from its own tile during the sweep.
    # Items with bit-identical logits to the target (twins) still count against it.
    # 12 rows: tiles of 21760 items at 1 MiB. Two whole tiles (one GEMM shape, so twins get
    # bit-identical logits), and each item's twin lies in the other tile.
    num_items = 2 * 21760
    half = num_items // 2
    hidden, weight, bias = seed_inputs(4, 3, 32, num_items, dtype, duplicate_half=True)
    lse = f64_lse(hidden, weight, bias)
    targets = torch.tensor([5, 30000, 21759, 43000], device=DEVICE)
    twins = torch.where(targets < half, targets + half, targets - half)
    offsets, twin_ids = ops.exclusion_csr([[t] for t in twins.tolist()], device=DEVICE)
    rank = lib.seed_target_rank(hidden, weight, bias, targets, None, None, lse)
    without_twin = lib.seed_target_rank(hidden, weight, bias, targets, offsets, twin_ids, lse)
    assert torch.equal(rank, without_twin + 1)
    check_rank(rank, hidden, weight, bias, targets, None, None, dtype, lse)


def test_seed_target_rank_with_lse_falls_back_when_many_items_tie():
    # 6000 items identical to item 0 all land in the bracket around the target's estimate, more
    # than the 4096 kept per user: the op must rank the two-pass way, still exactly.
    num_items, twins = 9000, 6000
    hidden, weight, bias = seed_inputs(2, 3, 16, num_items, torch.float32)
    weight[1:twins] = weight[0]
    bias[1:twins] = bias[0]
    lse = f64_lse(hidden, weight, bias)
    targets = torch.tensor([0, 0], device=DEVICE)
    rank = lib.seed_target_rank(hidden, weight, bias, targets, None, None, lse)
    offsets, excluded = ops.exclusion_csr([list(range(1, twins))] * 2, device=DEVICE)
    without = lib.seed_target_rank(hidden, weight, bias, targets, offsets, excluded, lse)
    assert torch.equal(rank, without + (twins - 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_seed_target_rank_one_sweep_equals_two_pass(small_tiles, dtype):
    # Under graph capture a given lse still runs pass 1 (the two-pass way); eagerly it is one
    # sweep. Same GEMMs, same scores, exact comparisons: the ranks must be equal.
    batch, seeds, dim, num_items = 6, 10, 24, 20011
    hidden, weight, bias = seed_inputs(batch, seeds, dim, num_items, dtype)
    lse = f64_lse(hidden, weight, bias)
    targets = torch.randint(0, num_items, (batch,), device=DEVICE)
    offsets, excl_ids = exclusion_lists(batch, num_items, 40, torch.Generator().manual_seed(9))
    graph, captured = capture(lambda: lib.seed_target_rank(hidden, weight, bias, targets, offsets, excl_ids, lse))
    graph.replay()
    torch.cuda.synchronize()
    eager = lib.seed_target_rank(hidden, weight, bias, targets, offsets, excl_ids, lse)
    assert torch.equal(captured, eager)
    check_rank(eager, hidden, weight, bias, targets, offsets, excl_ids, dtype, lse)


# ---------------------------------------------------------------- CUDA graph capture


@pytest.mark.parametrize("k", [20, 1100])
def test_seed_topk_with_exclusions_under_graph_capture(k):
    batch, seeds, dim, num_items = 5, 4, 32, 6000
    hidden, weight, bias = seed_inputs(batch, seeds, dim, num_items, torch.float32)
    offsets, excl_ids = exclusion_lists(batch, num_items, 30, torch.Generator().manual_seed(k))
    graph, (values, ids) = capture(lambda: lib.seed_topk(hidden, weight, bias, k, offsets, excl_ids))
    fresh = seed_inputs(batch, seeds, dim, num_items, torch.float32)
    for target, source in zip((hidden, weight, bias), fresh):
        target.copy_(source)
    graph.replay()
    torch.cuda.synchronize()
    eager_values, eager_ids = lib.seed_topk(hidden, weight, bias, k, offsets, excl_ids)
    assert torch.equal(ids, eager_ids) and torch.equal(values, eager_values)
    check_topk(values, ids, hidden, weight, bias, k, offsets, excl_ids, torch.float32)


def test_seed_topk_capture_refuses_a_k_it_cannot_check():
    # k > V - len(exclude_ids): whether every user keeps k items is only known on the device.
    hidden, weight, bias = seed_inputs(2, 3, 16, 100, torch.float32)
    offsets, excl_ids = ops.exclusion_csr([[1, 2, 3], [4]], device=DEVICE)
    lib.seed_topk(hidden, weight, bias, 97, offsets, excl_ids)  # eager: checked, and it fits
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot be checked during CUDA graph capture"):
        with torch.cuda.graph(graph):
            lib.seed_topk(hidden, weight, bias, 97, offsets, excl_ids)


# ---------------------------------------------------------------- device-side value checks

NONFINITE_OPS = {
    "seed_avg_probs": lambda h, w, b, lse: lib.seed_avg_probs(h, w, b, lse),
    "seed_topk": lambda h, w, b, lse: lib.seed_topk(h, w, b, 5, None, None, lse),
    "seed_target_rank": lambda h, w, b, lse: lib.seed_target_rank(
        h, w, b, torch.tensor([3, 40], device=DEVICE), None, None, lse),
}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["hidden", "weight", "bias", "lse"])
@pytest.mark.parametrize("op", list(NONFINITE_OPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_seed_ops_reject_non_finite_inputs(op, where, bad, dtype):
    hidden, weight, bias = seed_inputs(2, 3, 8, 50, dtype)
    lse = torch.randn(2, 3, device=DEVICE)
    tensors = {"hidden": hidden, "weight": weight, "bias": bias, "lse": lse}
    tensors[where].view(-1)[tensors[where].numel() - 1] = bad  # the last element: the tail path
    with pytest.raises(RuntimeError, match=rf"^{op}: {where} contains a non-finite value \(nan or inf\)"):
        NONFINITE_OPS[op](hidden, weight, bias, lse)


def test_invalid_exclusion_offsets_match_the_cpu_messages():
    hidden, weight, _ = seed_inputs(3, 2, 8, 50, torch.float32)
    cases = {
        "drop": ([0, 2, 1, 3], [1, 2, 3]),
        "first not 0": ([1, 1, 2, 3], [1, 2, 3]),
    }
    for name, (offsets, ids) in cases.items():
        messages = []
        for device in ("cpu", DEVICE):
            with pytest.raises(RuntimeError) as error:
                lib.seed_topk(hidden.to(device), weight.to(device), None, 3,
                              torch.tensor(offsets, device=device), torch.tensor(ids, device=device))
            messages.append(str(error.value).splitlines()[0])
        assert messages[0] == messages[1], name


def host_syncs(fn) -> int:
    """Device-to-host synchronisations during fn(), as torch's sync debug mode reports them."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def test_seed_topk_reads_the_device_once_per_call():
    # Exclusions, a target, every value check: one read of the failure word at the end.
    hidden, weight, bias = seed_inputs(4, 3, 32, 5000, torch.float32)
    offsets, excl_ids = exclusion_lists(4, 5000, 30, torch.Generator().manual_seed(2))
    targets = torch.tensor([1, 2, 3, 4], device=DEVICE)
    assert host_syncs(lambda: lib.seed_topk(hidden, weight, bias, 20, offsets, excl_ids)) == 1
    assert host_syncs(lambda: lib.seed_target_rank(hidden, weight, bias, targets, offsets, excl_ids)) == 1


# ---------------------------------------------------------------- the real shape


def test_seed_topk_and_rank_at_one_million_items_bf16():
    batch, seeds, dim, num_items, k = 8, 10, 256, 1_000_000, 20
    generator = torch.Generator(device=DEVICE).manual_seed(14)
    hidden = torch.randn(batch, seeds, dim, device=DEVICE, generator=generator).bfloat16()
    weight = (torch.randn(num_items, dim, device=DEVICE, generator=generator) / dim**0.5).bfloat16()
    bias = (torch.randn(num_items, device=DEVICE, generator=generator) * 0.1).bfloat16()
    offsets, excl_ids = exclusion_lists(batch, num_items, 50, torch.Generator().manual_seed(14))
    poison_allocator()
    values, ids = lib.seed_topk(hidden, weight, bias, k, offsets, excl_ids)
    check_topk(values, ids, hidden, weight, bias, k, offsets, excl_ids, torch.bfloat16)
    targets = ids[:, 7].clone()  # a target ranked 7th: rank 7 up to near-ties
    rank = lib.seed_target_rank(hidden, weight, bias, targets, offsets, excl_ids)
    check_rank(rank, hidden, weight, bias, targets, offsets, excl_ids, torch.bfloat16)
