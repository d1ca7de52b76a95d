"""Calls every CUDA op once on small inputs, for `compute-sanitizer --tool memcheck` (run.sh runs
it with PYTORCH_NO_CUDA_MEMORY_CACHING=1, so each tensor is its own allocation and an access past
its end is caught). Covers the vector and scalar paths, both top-k paths, exclusion, a given lse,
and an absent (-1) cross-entropy target."""

import torch

import diffrec_ext.ops as ops

lib = torch.ops.diffrec_ext
device = "cuda"
torch.manual_seed(0)

for dtype in (torch.bfloat16, torch.float32):
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

    hidden = torch.randn(3, 4, 24, device=device, dtype=dtype)
    weight = torch.randn(3001, 24, device=device, dtype=dtype)
    bias = torch.randn(3001, device=device, dtype=dtype)
    offsets, excluded = ops.exclusion_csr([[1, 5, 5], [], [3000]], device=device)
    targets = torch.tensor([0, 17, 3000], device=device)
    lib.seed_avg_probs(hidden, weight, bias)
    lib.seed_topk(hidden, weight, bias, 20, offsets, excluded)
    lib.seed_topk(hidden, weight, None, 1500, offsets, excluded)  # the sorted path
    lse = torch.logsumexp(torch.einsum("bsd,vd->bsv", hidden.float(), weight.float()), dim=-1)
    lib.seed_topk(hidden, weight, None, 7, None, None, lse)
    lib.seed_target_rank(hidden, weight, bias, targets, offsets, excluded)

    xent_hidden = torch.randn(5, 24, device=device, dtype=dtype)
    xent_targets = torch.tensor([0, -1, 3000, 5, 1234], device=device)
    loss, row_lse = lib.catalog_xent(xent_hidden, weight, bias, xent_targets)
    lib.catalog_xent_backward(torch.randn_like(loss), xent_hidden, weight, bias, xent_targets, row_lse)

torch.cuda.synchronize()
print("sanitizer smoke: every op ran")
