"""Calls every CUDA op on small inputs, for compute-sanitizer (memcheck, racecheck). run.sh runs it
with DIFFREC_CUDA_TILE_MIB=1, so every catalog sweep crosses several tiles (256 to ~4000 items
each) and the sorted top-k (k > 1024) several user groups, and for memcheck with
PYTORCH_NO_CUDA_MEMORY_CACHING=1, so each tensor is its own allocation and an access past its end
is caught. Covers the vector and scalar paths, both top-k paths with k above the tile width,
exclusion, a given lse, the split log-sum-exp grid of catalog_xent, an absent (-1) cross-entropy
target, and the device-side checks on invalid input (which must raise, not fault).

    python3 benchmarks/gpu/sanitizer_smoke.py [--quick]   (--quick: float32 only, for racecheck)
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root (in-place build)
import diffrec_ext.ops as ops  # noqa: E402

lib = torch.ops.diffrec_ext
device = "cuda"
torch.manual_seed(0)
quick = "--quick" in sys.argv[1:]
print(f"sanitizer smoke: DIFFREC_CUDA_TILE_MIB={os.environ.get('DIFFREC_CUDA_TILE_MIB', 'unset')}", flush=True)


def exclusion(users, num_items, per_user):
    lists = [torch.randint(0, num_items, (per_user if u % 3 else 0,)).tolist() for u in range(users)]
    return ops.exclusion_csr(lists, device=device)


for dtype in (torch.float32,) if quick else (torch.bfloat16, torch.float32):
    for dim in (64, 37):  # 16-byte vectors, then the scalar path
        item = torch.randn(3, 5, dim, device=device, dtype=dtype)
        pos = torch.randn(5, dim, device=device, dtype=dtype)
        steps = torch.tensor([0, 7, 10], device=device)
        schedule = torch.rand(11, device=device)
        noise = torch.randn(3, 2, dim, device=device, dtype=dtype)
        mask = torch.rand(3, 5, device=device) < 0.3
        out = lib.denoiser_input(item, pos, steps, schedule, schedule, noise, mask, 2, True, True)
        lib.denoiser_input_backward(torch.randn_like(out), steps, schedule, mask, 2, True)
        lib.denoiser_input_backward(torch.randn_like(out), steps, schedule, None, 2, False)

    # 6 users x 10 seeds: tiles of ~4000 items at 1 MiB, so V = 20011 takes 5-6 tiles.
    users, num_items = 6, 20011
    hidden = torch.randn(users, 10, 24, device=device, dtype=dtype)
    weight = torch.randn(num_items, 24, device=device, dtype=dtype)
    bias = torch.randn(num_items, device=device, dtype=dtype)
    offsets, excluded = exclusion(users, num_items, 30)
    targets = torch.randint(0, num_items, (users,), device=device)
    lib.seed_avg_probs(hidden, weight, bias)
    lib.seed_topk(hidden, weight, bias, 20, offsets, excluded)
    lib.seed_topk(hidden, weight, None, 1500, offsets, excluded)  # sorted path, groups of 3 users
    lse = torch.logsumexp(torch.einsum("bsd,vd->bsv", hidden.float(), weight.float()), dim=-1)
    lib.seed_topk(hidden, weight, None, 7, None, None, lse)
    lib.seed_target_rank(hidden, weight, bias, targets, offsets, excluded)
    lib.seed_target_rank(hidden, weight, None, targets, None, None, lse)

    # 100 users x 20 seeds: tiles of 256 items, below k = 1000 (the running top-k fills slowly).
    many = torch.randn(100, 20, 16, device=device, dtype=dtype)
    small_weight = torch.randn(3001, 16, device=device, dtype=dtype)
    many_offsets, many_excluded = exclusion(100, 3001, 5)
    lib.seed_topk(many, small_weight, None, 1000, many_offsets, many_excluded)

    # 5 rows: each tile is split along its columns (the 2-D log-sum-exp grid).
    xent_hidden = torch.randn(5, 24, device=device, dtype=dtype)
    xent_weight = torch.randn(70001, 24, device=device, dtype=dtype)
    xent_bias = torch.randn(70001, device=device, dtype=dtype)
    xent_targets = torch.tensor([0, -1, 70000, 5, 1234], device=device)
    loss, row_lse = lib.catalog_xent(xent_hidden, xent_weight, xent_bias, xent_targets)
    lib.catalog_xent_backward(torch.randn_like(loss), xent_hidden, xent_weight, xent_bias, xent_targets,
                              row_lse)

# Invalid values are found on the device after the kernels ran: they must raise, never fault.
bad_hidden = torch.randn(3, 2, 8, device=device)
bad_weight = torch.randn(50, 8, device=device)
invalid = {
    "offsets past the ids": lambda: lib.seed_topk(bad_hidden, bad_weight, None, 3,
                                                   torch.tensor([0, 1, 9, 2], device=device),
                                                   torch.tensor([4, 5], device=device)),
    "target past V": lambda: lib.seed_target_rank(bad_hidden, bad_weight, torch.randn(50, device=device),
                                                  torch.tensor([0, 1, 500], device=device), None, None),
    "xent target past V": lambda: lib.catalog_xent(bad_hidden[:, 0], bad_weight, torch.randn(50, device=device),
                                                   torch.tensor([0, 1000, 2], device=device)),
    "step past N": lambda: lib.denoiser_input(item, pos, torch.tensor([0, 70, 1], device=device), schedule,
                                              schedule, noise, None, 2, True, True),
}
for name, call in invalid.items():
    try:
        call()
    except RuntimeError as error:
        print(f"rejected ({name}): {str(error).splitlines()[0]}")
    else:
        raise SystemExit(f"{name} was not rejected")

torch.cuda.synchronize()
print("sanitizer smoke: every op ran")
