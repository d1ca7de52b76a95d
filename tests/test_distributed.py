"""Catalog sharding across 2 processes against the single-process ops.

One torchrun launch (2 processes, Gloo on a free loopback port) runs every case of this file in
its workers (this file is also the worker script, see `_worker_main`); each rank saves what it got,
and the tests below compare both ranks' results with ops.seed_topk / ops.seed_target_rank /
ops.catalog_xent on the whole catalog in this process.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from conftest import capture_error, run_torchrun

from diffrec_ext import distributed as dd
from diffrec_ext import ops

pytestmark = pytest.mark.skipif(
    not (ops.HAVE_EXTENSION and torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs the compiled extension and torch.distributed with Gloo",
)

WORLD_SIZE = 2
# Scores, losses and lse are in the accumulation dtype (float32 for bfloat16 inputs); gradients
# come back in the input dtype, and a bfloat16 hidden gradient is rounded once per shard's part.
RTOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-5}
GRAD_RTOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2}

# layout: "balanced" = shard_range; "reversed" = rank 0 holds the upper part; "uneven" = rank 0
# holds the first 2 items. exclude: None, "random", "whole_shard" (user 0 loses all of the upper
# shard), "crowded" (most of a shard excluded for a user, so the local op gets re-admitted items).
TOPK_CASES = {
    "odd_V_bias_exclusions": dict(num_items=37, batch=3, seeds=4, dim=8, k=5, exclude="random"),
    "k_above_shard_size": dict(num_items=11, batch=4, seeds=3, dim=6, k=9, exclude="random"),
    "k_equals_V": dict(num_items=11, batch=2, seeds=2, dim=4, k=11, bias=False),
    "one_item_per_shard": dict(num_items=2, batch=3, seeds=2, dim=4, k=2),
    "whole_shard_excluded": dict(num_items=12, batch=3, seeds=3, dim=5, k=4, exclude="whole_shard"),
    "crowded_exclusions": dict(num_items=20, batch=3, seeds=2, dim=5, k=7, exclude="crowded"),
    "larger_catalog": dict(num_items=3001, batch=5, seeds=6, dim=32, k=20, exclude="random"),
    "reversed_layout": dict(num_items=23, batch=3, seeds=3, dim=6, k=15, exclude="random", layout="reversed"),
    "uneven_layout": dict(num_items=23, batch=3, seeds=3, dim=6, k=6, layout="uneven"),
    "float64": dict(num_items=37, batch=3, seeds=4, dim=8, k=12, exclude="random", dtype=torch.float64),
    "tied_copies_across_shards": dict(num_items=16, batch=3, seeds=2, dim=4, k=6, ties=True),
    "bfloat16": dict(num_items=37, batch=3, seeds=4, dim=8, k=12, exclude="random", dtype=torch.bfloat16),
}
RANK_CASES = {
    "odd_V_exclusions": dict(num_items=37, batch=6, seeds=4, dim=8, exclude="random"),
    "one_item_per_shard": dict(num_items=2, batch=3, seeds=2, dim=4),
    "larger_catalog": dict(num_items=3001, batch=5, seeds=6, dim=32, exclude="random", bias=False),
    "reversed_layout": dict(num_items=23, batch=4, seeds=3, dim=6, exclude="random", layout="reversed"),
    "float64": dict(num_items=37, batch=6, seeds=4, dim=8, exclude="random", dtype=torch.float64),
    "tied_copies_across_shards": dict(num_items=16, batch=3, seeds=2, dim=4, ties=True),
}
XENT_CASES = {
    "odd_V_bias": dict(num_items=37, batch=7, dim=8),
    "no_bias": dict(num_items=11, batch=5, dim=6, bias=False),
    "one_item_per_shard": dict(num_items=2, batch=4, dim=3),
    "larger_catalog": dict(num_items=3001, batch=6, dim=32),
    "uneven_layout": dict(num_items=23, batch=5, dim=6, layout="uneven"),
    "float64": dict(num_items=37, batch=7, dim=8, dtype=torch.float64),
    "bfloat16": dict(num_items=37, batch=7, dim=8, dtype=torch.bfloat16),
}


# ----------------------------------------------------------------------------- inputs


def shard_of(num_items: int, rank: int, layout: str = "balanced") -> tuple[int, int]:
    if layout == "balanced":
        return dd.shard_range(num_items, rank, WORLD_SIZE)
    if layout == "reversed":
        return dd.shard_range(num_items, WORLD_SIZE - 1 - rank, WORLD_SIZE)
    if layout == "uneven":
        return (0, 2) if rank == 0 else (2, num_items)
    raise ValueError(layout)


def make_case(num_items, batch, dim, seeds=None, k=None, bias=True, exclude=None, layout="balanced",
              dtype=torch.float32, ties=False, seed=0):
    """Deterministic inputs of a case, the same in the workers and in this process."""
    gen = torch.Generator().manual_seed(seed + num_items * 7 + batch)
    shape = (batch, seeds, dim) if seeds else (batch, dim)
    hidden = torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
    weight = (torch.randn(num_items, dim, generator=gen, dtype=torch.float64) / dim**0.5).to(dtype)
    bias_t = (torch.randn(num_items, generator=gen, dtype=torch.float64) * 0.5).to(dtype) if bias else None
    if ties:  # item 1 (first shard) and item V - 2 (second shard) are the same, and on top
        weight[num_items - 2] = weight[1]
        if bias_t is not None:
            bias_t[1] = bias_t[num_items - 2] = 4.0
    case = dict(hidden=hidden, weight=weight, bias=bias_t, k=k, layout=layout, exclusions=None)
    if exclude is not None:
        lists = []
        upper_start = shard_of(num_items, 1, "balanced")[0]
        for user in range(batch):
            if exclude == "whole_shard" and user == 0:
                ids = list(range(upper_start, num_items)) + [upper_start]  # with a duplicate
            elif exclude == "crowded" and user < 2:
                # all but one item of one shard (user 0: lower shard, user 1: upper shard)
                lo, hi = (0, upper_start) if user == 0 else (upper_start, num_items)
                ids = list(range(lo, hi - 1))
            else:
                count = int(torch.randint(0, 4, (), generator=gen))
                ids = torch.randint(0, num_items, (count,), generator=gen).tolist()
            lists.append(ids)
        case["exclusions"] = ops.exclusion_csr(lists)
    if seeds is not None and k is None:  # a rank case: targets, incl. the first and the last item
        targets = torch.randint(0, num_items, (batch,), generator=gen)
        targets[0], targets[-1] = 0, num_items - 1
        if ties:
            targets[0] = 1
        case["targets"] = targets
    if seeds is None:
        targets = torch.randint(0, num_items, (batch,), generator=gen)
        targets[0], targets[-1] = 0, num_items - 1
        case["targets"] = targets
        case["grad_loss"] = torch.randn(batch, generator=gen, dtype=torch.float64).to(reference_acc(dtype))
    return case


def reference_acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def local_shard(case, rank):
    start, stop = shard_of(case["weight"].shape[0], rank, case["layout"])
    bias = None if case["bias"] is None else case["bias"][start:stop]
    return case["weight"][start:stop], bias, start


# ----------------------------------------------------------------------------- worker (torchrun)


def _error_cases(rank: int) -> dict:
    """Bad input on one rank or on all; every rank must raise (and none may hang)."""
    case = make_case(**TOPK_CASES["odd_V_bias_exclusions"])
    hidden, weight, bias, start = case["hidden"], *local_shard(case, rank)
    offsets, ids = case["exclusions"]
    results = {}
    results["overlapping_shards"] = capture_error(
        lambda: dd.sharded_seed_topk(hidden, weight, bias, 5, start - (rank == 1), group=None))
    results["gap_between_shards"] = capture_error(
        lambda: dd.sharded_seed_topk(hidden, weight, bias, 5, start + (rank == 1)))
    results["k_above_V"] = capture_error(lambda: dd.sharded_seed_topk(hidden, weight, bias, 38, start))
    results["k_above_items_left"] = capture_error(lambda: dd.sharded_seed_topk(
        hidden, weight, bias, 5, start, torch.tensor([0, 34, 34, 34]), torch.arange(34)))
    results["bad_weight_on_rank_1"] = capture_error(lambda: dd.sharded_seed_topk(
        hidden, weight if rank == 0 else torch.zeros(weight.shape[0], 9), bias, 5, start))
    results["batch_differs"] = capture_error(lambda: dd.sharded_seed_topk(
        hidden if rank == 0 else hidden[:2], weight, bias, 5, start))
    results["exclusion_id_out_of_catalog"] = capture_error(lambda: dd.sharded_seed_topk(
        hidden, weight, bias, 5, start, offsets, torch.where(ids == ids[0], 37, ids)))
    results["target_out_of_catalog"] = capture_error(lambda: dd.sharded_target_rank(
        hidden, weight, bias, torch.tensor([0, 37, 1]), start))
    xent = make_case(**XENT_CASES["odd_V_bias"])
    w, b, s = local_shard(xent, rank)
    results["xent_target_negative"] = capture_error(lambda: dd.sharded_catalog_xent(
        xent["hidden"], w, b, torch.full_like(xent["targets"], -1), s))
    # After all that, the group must still work.
    values, _ = dd.sharded_seed_topk(hidden, weight, bias, 5, start)
    results["still_usable"] = values
    return results


def _worker_main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    out = Path(parser.parse_args().out)
    torch.set_num_threads(1)
    context = dd.init_process_group_from_env()
    rank = context.rank
    results = {"context": (context.rank, context.world_size, context.backend), "topk": {}, "rank": {}, "xent": {}}
    for name, params in TOPK_CASES.items():
        case = make_case(**params)
        weight, bias, start = local_shard(case, rank)
        offsets, ids = case["exclusions"] or (None, None)
        results["topk"][name] = dd.sharded_seed_topk(case["hidden"], weight, bias, case["k"], start, offsets, ids)
    for name, params in RANK_CASES.items():
        case = make_case(**params)
        weight, bias, start = local_shard(case, rank)
        offsets, ids = case["exclusions"] or (None, None)
        results["rank"][name] = dd.sharded_target_rank(case["hidden"], weight, bias, case["targets"], start,
                                                       offsets, ids)
    for name, params in XENT_CASES.items():
        case = make_case(**params)
        weight, bias, start = local_shard(case, rank)
        hidden = case["hidden"].clone().requires_grad_(True)
        weight = weight.clone().requires_grad_(True)
        bias = None if bias is None else bias.clone().requires_grad_(True)
        loss = dd.sharded_catalog_xent(hidden, weight, bias, case["targets"], start)
        (loss * case["grad_loss"]).sum().backward()
        results["xent"][name] = dict(loss=loss.detach(), hidden=hidden.grad, weight=weight.grad,
                                     bias=None if bias is None else bias.grad)
    case = make_case(**TOPK_CASES["larger_catalog"])
    results["lse"] = dd.sharded_seed_lse(case["hidden"], *local_shard(case, rank))
    results["errors"] = _error_cases(rank)
    torch.save(results, out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------- launcher


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    run_torchrun([Path(__file__).resolve(), "--out", out], WORLD_SIZE, timeout=180)
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]


def test_workers_ran_on_gloo(worker_results):
    assert [r["context"] for r in worker_results] == [(0, 2, "gloo"), (1, 2, "gloo")]


@pytest.mark.parametrize("name", list(TOPK_CASES))
def test_sharded_topk_equals_single_process(worker_results, name):
    case = make_case(**TOPK_CASES[name])
    offsets, ids = case["exclusions"] or (None, None)
    want_values, want_ids = ops.seed_topk(case["hidden"], case["weight"], case["bias"], case["k"], offsets, ids)
    for rank, results in enumerate(worker_results):
        values, got_ids = results["topk"][name]
        assert got_ids.dtype == torch.int64 and values.dtype == want_values.dtype
        assert torch.equal(got_ids, want_ids), f"rank {rank}: ids\n{got_ids}\nwant\n{want_ids}"
        torch.testing.assert_close(values, want_values, rtol=RTOL[case["hidden"].dtype], atol=0)
    # every rank returns the very same tensors
    assert torch.equal(worker_results[0]["topk"][name][0], worker_results[1]["topk"][name][0])


def test_tied_copies_rank_by_smaller_id(worker_results):
    _, ids = worker_results[0]["topk"]["tied_copies_across_shards"]
    assert (ids[:, 0] == 1).all() and (ids[:, 1] == 14).all()


@pytest.mark.parametrize("name", list(RANK_CASES))
def test_sharded_target_rank_equals_single_process(worker_results, name):
    case = make_case(**RANK_CASES[name])
    offsets, ids = case["exclusions"] or (None, None)
    want = ops.seed_target_rank(case["hidden"], case["weight"], case["bias"], case["targets"], offsets, ids)
    for rank, results in enumerate(worker_results):
        assert torch.equal(results["rank"][name], want), f"rank {rank}: {results['rank'][name]} want {want}"


def test_tied_copy_counts_against_the_target(worker_results):
    ranks = worker_results[0]["rank"]["tied_copies_across_shards"]
    assert ranks[0] == 1  # item 1's copy (item 14, other shard) ties with it: pessimistic


@pytest.mark.parametrize("name", list(XENT_CASES))
def test_sharded_xent_equals_single_process(worker_results, name):
    case = make_case(**XENT_CASES[name])
    hidden = case["hidden"].clone().requires_grad_(True)
    weight = case["weight"].clone().requires_grad_(True)
    bias = None if case["bias"] is None else case["bias"].clone().requires_grad_(True)
    loss, _ = ops.catalog_xent(hidden, weight, bias, case["targets"])
    (loss * case["grad_loss"]).sum().backward()
    rtol = GRAD_RTOL[case["hidden"].dtype]
    for rank, results in enumerate(worker_results):
        got = results["xent"][name]
        start, stop = shard_of(weight.shape[0], rank, case["layout"])
        torch.testing.assert_close(got["loss"], loss.detach(), rtol=RTOL[case["hidden"].dtype], atol=0)
        torch.testing.assert_close(got["hidden"], hidden.grad, rtol=rtol, atol=rtol * hidden.grad.abs().max())
        torch.testing.assert_close(got["weight"], weight.grad[start:stop], rtol=rtol,
                                   atol=rtol * weight.grad.abs().max())
        if bias is None:
            assert got["bias"] is None
        else:
            torch.testing.assert_close(got["bias"], bias.grad[start:stop], rtol=rtol,
                                       atol=rtol * bias.grad.abs().max())


def test_sharded_seed_lse_equals_the_whole_catalog_lse(worker_results):
    case = make_case(**TOPK_CASES["larger_catalog"])
    batch, seeds, dim = case["hidden"].shape
    rows = case["hidden"].reshape(-1, dim)
    _, want = ops.catalog_xent(rows, case["weight"], case["bias"], torch.zeros(batch * seeds, dtype=torch.int64))
    for results in worker_results:
        torch.testing.assert_close(results["lse"], want.view(batch, seeds), rtol=1e-6, atol=0)
    assert torch.equal(worker_results[0]["lse"], worker_results[1]["lse"])  # bit-identical on every rank


ERRORS = {
    "overlapping_shards": "the shards overlap at item 18",
    "gap_between_shards": "the shards leave a gap at item 19",
    "k_above_V": r"k = 38 must be in \[1, V = 37\]",
    "k_above_items_left": "k = 5 exceeds the 3 items left for user 0",
    "bad_weight_on_rank_1": r"rank 1: weight_shard must be \[V_r, d\] with d = 8",
    "batch_differs": r"B differs across ranks \(\[3, 2\]",
    "exclusion_id_out_of_catalog": r"exclude_ids\[0\] = 37 is out of the catalog \[0, 36\]",
    "target_out_of_catalog": r"targets\[1\] = 37 is out of the catalog",
    "xent_target_negative": r"targets\[0\] = -1 is out of the catalog",
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_bad_input_raises_on_every_rank(worker_results, name):
    import re

    for rank, results in enumerate(worker_results):
        kind, message = results["errors"][name]
        assert kind == "ShardingError", f"rank {rank}: {kind}: {message}"
        assert re.search(ERRORS[name], message), f"rank {rank}: {message}"


def test_group_still_usable_after_errors(worker_results):
    case = make_case(**TOPK_CASES["odd_V_bias_exclusions"])
    want, _ = ops.seed_topk(case["hidden"], case["weight"], case["bias"], 5)
    for results in worker_results:
        torch.testing.assert_close(results["errors"]["still_usable"], want, rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------- single process


@pytest.mark.parametrize("num_items,world_size", [(1, 1), (2, 2), (11, 2), (200_000, 3), (10, 4), (7, 7)])
def test_shard_range_tiles_the_catalog_in_balanced_contiguous_shards(num_items, world_size):
    shards = [dd.shard_range(num_items, rank, world_size) for rank in range(world_size)]
    assert shards[0][0] == 0 and shards[-1][1] == num_items
    assert all(a[1] == b[0] for a, b in zip(shards, shards[1:]))
    sizes = [stop - start for start, stop in shards]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1 and sizes == sorted(sizes, reverse=True)


def test_shard_range_rejects_bad_arguments():
    with pytest.raises(ValueError, match="cannot be cut into 3 non-empty shards"):
        dd.shard_range(2, 0, 3)
    with pytest.raises(ValueError, match="rank = 2 must be in"):
        dd.shard_range(10, 2, 2)
    with pytest.raises(ValueError, match="world_size = 0"):
        dd.shard_range(10, 0, 0)


def test_shard_catalog_gives_views_of_this_ranks_rows():
    weight, bias = torch.randn(11, 3), torch.randn(11)
    shard = dd.shard_catalog(weight, bias, rank=1, world_size=2)
    assert (shard.start, shard.stop) == (6, 11)
    assert shard.weight.data_ptr() == weight[6].data_ptr() and torch.equal(shard.bias, bias[6:])


def test_calls_without_a_process_group_say_how_to_start_one(monkeypatch):
    if torch.distributed.is_initialized():
        pytest.skip("a process group exists in this process")
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        dd.sharded_seed_topk(torch.randn(2, 3, 4), torch.randn(5, 4), None, 2, 0)
    with pytest.raises(RuntimeError, match="launch with torchrun"):
        dd.init_process_group_from_env()


if __name__ == "__main__":
    _worker_main()
