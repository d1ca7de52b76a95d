"""Pure-PyTorch twins of every compiled op, with the same names and the same contracts.

They are the specification the C++ and CUDA kernels are tested against (in float64), and the
fallback when the compiled extension is missing. They materialise whatever is convenient and are
not meant to be fast.

Contracts shared by all ops:
- Accumulation dtype: float64 for float64 inputs, float32 otherwise (float32, bfloat16, float16).
  Scores, probabilities, losses and log-sum-exps are returned in the accumulation dtype;
  gradients come back in the dtype of the tensor they belong to.
- Item ids, steps, offsets: int64.
- The catalog is the rows of `weight` [V, d]; `bias` [V] is optional (None = zeros).
- Exclusion lists are CSR: `exclude_offsets` [B + 1] (non-decreasing, starting at 0, ending at
  nnz) and `exclude_ids` [nnz] in [0, V). Excluded items are removed from the ranking only: the
  softmax normalisation is still over the whole catalog. Duplicates are allowed.
- Ties in top-k: larger value first, then smaller item id first.
- The seed ops take an optional `lse` [B, S] (accumulation dtype): the log-normaliser of each
  (user, seed) softmax. Given, it replaces the one computed over `weight`, so `weight` can be one
  slice of a catalog sharded across processes. catalog_xent takes target -1 for "not in this
  slice": that row's loss is its lse and its gradient has no one-hot term.
"""

from __future__ import annotations

import math

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def step_embedding(steps: torch.Tensor, dim: int, dtype=torch.float64) -> torch.Tensor:
    """Sinusoidal step embedding of Eq. 15, interleaved: z(2j) = sin(n w_j), z(2j+1) = cos(n w_j),
    w_j = 10000^(-2j/d). Computed in float64. Shape [B, d]."""
    j = torch.arange(dim, dtype=torch.float64, device=steps.device) // 2
    freq = torch.exp(-math.log(10000.0) * (2.0 * j) / dim)
    angle = steps.to(torch.float64)[:, None] * freq[None, :]
    even = (torch.arange(dim, device=steps.device) % 2 == 0)[None, :]
    return torch.where(even, torch.sin(angle), torch.cos(angle)).to(dtype)


def denoiser_input(
    item_emb: torch.Tensor,
    pos_emb: torch.Tensor,
    steps: torch.Tensor,
    sqrt_abar: torch.Tensor,
    sqrt_one_minus_abar: torch.Tensor,
    noise: torch.Tensor,
    padding_mask: torch.Tensor | None,
    noised_positions: int,
    add_position: bool,
    add_step: bool,
) -> torch.Tensor:
    """Input of the Denoise Sequential Recommender (Eq. 7 and Eq. 14).

    item_emb [B, T, d], pos_emb [T, d], sqrt_abar and sqrt_one_minus_abar [N + 1], noise [B, K, d]
    with K = noised_positions in [0, T], padding_mask [B, T] bool (True = padding) or None.
    `steps` in [0, N] is either [B], one step per sequence, or [B, K], one step per noised position.

    One step per sequence (the paper, Eq. 14): n = steps[b] everywhere, and
    out[b, t] = h'[b, t] + pos[t] * add_position + z(n) * add_step, where
    h'[b, t] = sqrt_abar[n] h[b, t] + sqrt_one_minus_abar[n] noise[b, t - (T - K)] on the last K
    positions and h[b, t] elsewhere.
    One step per noised position: the noised position t = T - K + k uses n = steps[b, k] for its
    noise and its step embedding; the clean positions get no step embedding (they are shared by
    targets noised at different steps, see model.DSR.forward_two_stream).
    Padding positions are exactly zero.
    """
    batch, length, dim = item_emb.shape
    acc = acc_dtype(item_emb.dtype)
    h = item_emb.to(acc)
    k = noised_positions
    per_position = steps.dim() == 2
    if k > 0:
        a = sqrt_abar.to(acc)[steps]
        s = sqrt_one_minus_abar.to(acc)[steps]
        a, s = (a[:, :, None], s[:, :, None]) if per_position else (a[:, None, None], s[:, None, None])
        noised = a * h[:, length - k :] + s * noise.to(acc)
        h = torch.cat([h[:, : length - k], noised], dim=1)
    if add_position:
        h = h + pos_emb.to(acc)[None]
    if add_step and per_position:
        z = step_embedding(steps.reshape(-1), dim, acc).reshape(batch, k, dim)
        h = torch.cat([h[:, : length - k], h[:, length - k :] + z], dim=1)
    elif add_step:
        h = h + step_embedding(steps, dim, acc)[:, None, :]
    if padding_mask is not None:
        h = h.masked_fill(padding_mask[:, :, None], 0.0)
    return h.to(item_emb.dtype)


def denoiser_input_backward(
    grad_out: torch.Tensor,
    steps: torch.Tensor,
    sqrt_abar: torch.Tensor,
    padding_mask: torch.Tensor | None,
    noised_positions: int,
    add_position: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of denoiser_input with respect to item_emb [B, T, d] and pos_emb [T, d]
    (zeros when add_position is False); `steps` [B] or [B, K] as in denoiser_input."""
    acc = acc_dtype(grad_out.dtype)
    g = grad_out.to(acc)
    if padding_mask is not None:
        g = g.masked_fill(padding_mask[:, :, None], 0.0)
    length = g.shape[1]
    grad_pos = g.sum(0) if add_position else torch.zeros_like(g[0])
    k = noised_positions
    if k > 0:
        a = sqrt_abar.to(acc)[steps]
        a = a[:, :, None] if steps.dim() == 2 else a[:, None, None]
        g = torch.cat([g[:, : length - k], a * g[:, length - k :]], dim=1)
    return g.to(grad_out.dtype), grad_pos.to(grad_out.dtype)


def _seed_logits(hidden, weight, bias):
    acc = acc_dtype(hidden.dtype)
    logits = torch.einsum("bsd,vd->bsv", hidden.to(acc), weight.to(acc))
    if bias is not None:
        logits = logits + bias.to(acc)
    return logits


def seed_avg_probs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   lse: torch.Tensor | None = None) -> torch.Tensor:
    """mean_s softmax(hidden[b, s] @ weight.T + bias), shape [B, V] (Alg. 3)."""
    logits = _seed_logits(hidden, weight, bias)
    if lse is None:
        lse = torch.logsumexp(logits, dim=-1)
    return torch.exp(logits - lse.to(logits.dtype)[..., None]).mean(dim=1)


def exclusion_mask(exclude_offsets, exclude_ids, batch: int, num_items: int, device) -> torch.Tensor:
    """Dense [B, V] bool mask of a CSR exclusion list (True = excluded)."""
    mask = torch.zeros(batch, num_items, dtype=torch.bool, device=device)
    if exclude_offsets is not None:
        counts = exclude_offsets[1:] - exclude_offsets[:-1]
        rows = torch.repeat_interleave(torch.arange(batch, device=device), counts)
        mask[rows, exclude_ids] = True
    return mask


def _sorted_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Stable descending sort: equal scores keep ascending item ids.
    values, indices = torch.sort(scores, dim=-1, descending=True, stable=True)
    return values[:, :k], indices[:, :k]


def seed_topk(hidden, weight, bias, k: int, exclude_offsets=None, exclude_ids=None, lse=None):
    """The k items with the largest seed-averaged probability, per user: (values [B, k] in the
    accumulation dtype, indices [B, k] int64), sorted by value descending, ties by smaller id."""
    scores = seed_avg_probs(hidden, weight, bias, lse)
    mask = exclusion_mask(exclude_offsets, exclude_ids, scores.shape[0], scores.shape[1], scores.device)
    scores = scores.masked_fill(mask, float("-inf"))
    return _sorted_topk(scores, k)


def seed_target_rank(hidden, weight, bias, targets, exclude_offsets=None, exclude_ids=None, lse=None):
    """0-based rank of each target item under the seed-averaged probability: the number of
    other, non-excluded items whose score is >= the target's (ties count against the target)."""
    scores = seed_avg_probs(hidden, weight, bias, lse)
    mask = exclusion_mask(exclude_offsets, exclude_ids, scores.shape[0], scores.shape[1], scores.device)
    target_score = scores.gather(1, targets[:, None])
    beats = (scores >= target_score) & ~mask
    beats[torch.arange(scores.shape[0], device=scores.device), targets] = False
    return beats.sum(dim=1).to(torch.int64)


def catalog_xent(hidden, weight, bias, targets):
    """Per-row cross-entropy -log softmax(hidden @ weight.T + bias)[target] and the row's
    log-sum-exp, both [B] in the accumulation dtype."""
    acc = acc_dtype(hidden.dtype)
    logits = hidden.to(acc) @ weight.to(acc).T
    if bias is not None:
        logits = logits + bias.to(acc)
    lse = torch.logsumexp(logits, dim=-1)
    present = targets >= 0
    target_logit = logits.gather(1, targets.clamp_min(0)[:, None])[:, 0]
    return lse - torch.where(present, target_logit, torch.zeros_like(target_logit)), lse


def catalog_xent_backward(grad_loss, hidden, weight, bias, targets, lse):
    """Gradients of sum_b grad_loss[b] * loss[b]: (grad_hidden [B, d], grad_weight [V, d],
    grad_bias [V]) in the dtypes of hidden, weight and weight."""
    acc = acc_dtype(hidden.dtype)
    logits = hidden.to(acc) @ weight.to(acc).T
    if bias is not None:
        logits = logits + bias.to(acc)
    grad_logits = torch.exp(logits - lse.to(acc)[:, None])
    rows = torch.nonzero(targets >= 0)[:, 0]
    grad_logits[rows, targets[rows]] -= 1.0
    grad_logits = grad_logits * grad_loss.to(acc)[:, None]
    grad_hidden = grad_logits @ weight.to(acc)
    grad_weight = grad_logits.T @ hidden.to(acc)
    return (
        grad_hidden.to(hidden.dtype),
        grad_weight.to(weight.dtype),
        grad_logits.sum(0).to(weight.dtype),
    )


_MASK32 = 0xFFFFFFFF


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding uint32 values (products wrap in
    int64; their low 32 bits are the uint32 product)."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _MASK32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def dropout_bits(seed: int, index: torch.Tensor) -> torch.Tensor:
    """The uint32 random bits (as int64) of element `index` for a seed (csrc/dropout_hash.h)."""
    seed = seed & 0xFFFFFFFFFFFFFFFF
    low, high = index & _MASK32, index >> 32
    h = _fmix32(((low * 0x9E3779B9) & _MASK32) + (seed & _MASK32) & _MASK32)
    return _fmix32(h ^ ((high * 0x85EBCA77) & _MASK32) ^ (seed >> 32))


def seeded_dropout(input: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Dropout with a mask that is a function of (seed, element index) alone: element i (of the
    contiguous input) is kept iff dropout_bits(seed, i) >= floor(p * 2^32), and kept elements
    are scaled by 1 / (1 - p). p in [0, 1). The gradient is the same op on the gradient with the
    same seed. Output in the input's dtype, computed in the accumulation dtype."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"p must be in [0, 1), got {p}")
    index = torch.arange(input.numel(), dtype=torch.int64, device=input.device).reshape(input.shape)
    keep = dropout_bits(seed, index) >= math.floor(p * 2.0**32)
    acc = acc_dtype(input.dtype)
    return torch.where(keep, input.to(acc) * (1.0 / (1.0 - p)), 0.0).to(input.dtype)
