"""Python face of the compiled ops: fake (meta) kernels for torch.compile, autograd, and thin
wrappers that fall back to the pure-PyTorch twins in `reference` when the extension is missing.

Every op has the same name in four places: its schema in python/registration.cpp, its CPU kernel
in csrc/cpu/, its CUDA kernel in csrc/cuda/, and its twin in diffrec_ext/reference.py.
"""

from __future__ import annotations

import importlib

import torch

from . import reference

try:
    # the compiled part; loading it registers torch.ops.diffrec_ext.* (imported by name so that
    # lint-imports, which sees only Python modules, does not take it for the package root)
    _C = importlib.import_module(f"{__package__}._C")

    HAVE_EXTENSION = True
    BUILD_INFO = {"version": _C.__version__, "with_cuda": _C.with_cuda, "cuda_archs": _C.cuda_archs}
except ImportError as error:  # the package still works, on the twins, without its compiled part
    HAVE_EXTENSION = False
    BUILD_INFO = {"version": None, "with_cuda": False, "cuda_archs": "", "import_error": str(error)}


def _acc(dtype: torch.dtype) -> torch.dtype:
    return reference.acc_dtype(dtype)


def _same_device(ref_name: str, reference: torch.Tensor, **others) -> None:
    """The device check of csrc/checks.cpp, with its message, for the fake (meta) kernels: a call
    that mixes a meta tensor with real ones dispatches to the fake kernel, which would otherwise
    return uninitialised memory on the real tensors' device instead of an error."""
    for name, tensor in others.items():
        if isinstance(tensor, torch.Tensor) and tensor.device != reference.device:
            raise RuntimeError(f"{name} is on {tensor.device} but {ref_name} is on {reference.device}")


class _NotTwiceDifferentiable(torch.autograd.Function):
    """First-order gradients passed through unchanged; differentiating them again raises."""

    @staticmethod
    def forward(ctx, message, *grads):
        ctx.message = message
        return tuple(g.view_as(g) for g in grads)

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(ctx.message)


def _first_order_only(op_name: str, backward):
    """The autograd `backward` of an op whose gradient kernel has no derivative of its own. Under
    create_graph=True its gradients come back marked, so that differentiating them again raises
    instead of silently counting the op's second-order terms as zero."""
    message = (f"diffrec_ext.ops.{op_name} has no double backward (its gradient kernel is not differentiable): "
               f"differentiate through it once, or use the pure-PyTorch twin diffrec_ext.reference.{op_name}")

    def first_order(ctx, *grads):
        with torch.no_grad():
            results = backward(ctx, *grads)
        if not torch.is_grad_enabled():  # a plain backward (create_graph=False)
            return results
        present = [r.detach().requires_grad_() for r in results if r is not None]
        marked = iter(_NotTwiceDifferentiable.apply(message, *present))
        return tuple(None if r is None else next(marked) for r in results)

    return first_order


# ----------------------------------------------------------------------------- seed op gradients
# The seed ops' outputs are differentiable. Their gradients are computed here in PyTorch, over
# catalog tiles like the kernels (never a [B, S, V] tensor), from differentiable PyTorch ops, so
# they can be differentiated again.

_TILE_LOGITS = 1 << 22  # logits [B, S, tile] per catalog tile: 16 MB in float32


def _tiles(rows: int, num_items: int) -> list[tuple[int, int]]:
    size = max(1, _TILE_LOGITS // max(1, rows))
    return [(lo, min(lo + size, num_items)) for lo in range(0, num_items, size)]


def _tile_logits(h, weight, bias, lo: int, hi: int):
    """Logits [B, S, hi - lo] of catalog rows lo:hi, in the dtype of `h` (the accumulation dtype)."""
    logits = h @ weight[lo:hi].to(h.dtype).T
    return logits if bias is None else logits + bias[lo:hi].to(h.dtype)


def _log_normaliser(h, weight, bias, lse, tiles):
    if lse is not None:
        return lse.to(h.dtype)
    per_tile = [torch.logsumexp(_tile_logits(h, weight, bias, lo, hi), -1) for lo, hi in tiles]
    return torch.logsumexp(torch.stack(per_tile, -1), -1)


def _softmax_tiles(h, weight, bias, log_norm, tiles):
    for lo, hi in tiles:
        yield lo, hi, torch.exp(_tile_logits(h, weight, bias, lo, hi) - log_norm[..., None])


def _through_softmax(h, weight, bias, log_norm, tiles, coef, needs):
    """Logit gradients dL/dl = p * coef(lo, hi) (p = exp(l - log_norm)), tile by tile, pushed to
    (hidden [B, S, d], weight [V, d], bias [V]); None where `needs` says no."""
    grad_h, grad_w, grad_b = torch.zeros_like(h) if needs[0] else None, [], []
    for lo, hi, p in _softmax_tiles(h, weight, bias, log_norm, tiles):
        grad_logits = p * coef(lo, hi)
        if needs[0]:
            grad_h = grad_h + grad_logits @ weight[lo:hi].to(h.dtype)
        if needs[1]:
            grad_w.append(torch.einsum("bsv,bsd->vd", grad_logits, h))
        if needs[2]:
            grad_b.append(grad_logits.sum((0, 1)))
    return grad_h, torch.cat(grad_w) if needs[1] else None, torch.cat(grad_b) if needs[2] and bias is not None else None


def _cast(grads, *likes):
    return tuple(None if g is None else g.to(like.dtype) for g, like in zip(grads, likes))


def seed_avg_probs_backward(grad_probs, hidden, weight, bias, lse, needs=(True, True, True, True)):
    """Gradients of sum(grad_probs * seed_avg_probs(hidden, weight, bias, lse)) with respect to
    (hidden, weight, bias, lse); None where `needs` says no or the input is None."""
    h = hidden.to(reference.acc_dtype(hidden.dtype))
    grad = grad_probs.to(h.dtype)
    seeds = h.shape[1]
    tiles = _tiles(h.shape[0] * seeds, weight.shape[0])
    log_norm = _log_normaliser(h, weight, bias, lse, tiles)
    # E_p[grad] per (user, seed): what flows through the normaliser
    mean_grad = None
    if lse is None or needs[3]:
        mean_grad = sum((p * grad[:, None, lo:hi]).sum(-1) for lo, hi, p in _softmax_tiles(h, weight, bias, log_norm, tiles))
    shift = mean_grad[..., None] if lse is None else 0.0
    grads = (None, None, None)
    if any(needs[:3]):
        grads = _through_softmax(h, weight, bias, log_norm, tiles,
                                 lambda lo, hi: (grad[:, None, lo:hi] - shift) / seeds, needs[:3])
    grad_lse = -mean_grad / seeds if lse is not None and needs[3] else None
    return _cast((*grads, grad_lse), hidden, weight, weight, lse if lse is not None else hidden)


def seed_topk_backward(grad_values, ids, hidden, weight, bias, lse, needs=(True, True, True, True)):
    """Gradients of sum(grad_values * values), values, ids = seed_topk(hidden, weight, bias, ...,
    lse), with respect to (hidden, weight, bias, lse): the k picked items directly, the whole catalog
    (in tiles) through the softmax normaliser unless `lse` was given."""
    h = hidden.to(reference.acc_dtype(hidden.dtype))
    seeds, dim = h.shape[1], h.shape[2]
    tiles = _tiles(h.shape[0] * seeds, weight.shape[0])
    log_norm = _log_normaliser(h, weight, bias, lse, tiles)
    picked = weight[ids].to(h.dtype)  # [B, k, d]
    logits = torch.einsum("bsd,bkd->bsk", h, picked)
    if bias is not None:
        logits = logits + bias[ids].to(h.dtype)[:, None, :]
    # dL/dlogit of each picked item, [B, S, k]; their sum is what flows through the normaliser
    coef = grad_values.to(h.dtype)[:, None, :] * torch.exp(logits - log_norm[..., None]) / seeds
    through_norm = coef.sum(-1)
    flat_ids = ids.reshape(-1)
    grad_h = torch.einsum("bsk,bkd->bsd", coef, picked) if needs[0] else None
    grad_w = h.new_zeros(weight.shape).index_add(
        0, flat_ids, torch.einsum("bsk,bsd->bkd", coef, h).reshape(-1, dim)) if needs[1] else None
    grad_b = h.new_zeros(weight.shape[0]).index_add(
        0, flat_ids, coef.sum(1).reshape(-1)) if needs[2] and bias is not None else None
    if lse is None and any(needs[:3]):
        norm_h, norm_w, norm_b = _through_softmax(h, weight, bias, log_norm, tiles,
                                                  lambda lo, hi: -through_norm[..., None], needs[:3])
        grad_h = grad_h + norm_h if needs[0] else None
        grad_w = grad_w + norm_w if needs[1] else None
        grad_b = grad_b + norm_b if grad_b is not None else None
    grad_lse = -through_norm if lse is not None and needs[3] else None
    return _cast((grad_h, grad_w, grad_b, grad_lse), hidden, weight, weight, lse if lse is not None else hidden)


if HAVE_EXTENSION:
    _ops = torch.ops.diffrec_ext

    @torch.library.register_fake("diffrec_ext::denoiser_input")
    def _(item_emb, pos_emb, steps, sqrt_abar, sqrt_one_minus_abar, noise, padding_mask,
          noised_positions, add_position, add_step):
        _same_device("item_emb", item_emb, pos_emb=pos_emb, steps=steps, sqrt_abar=sqrt_abar,
                     sqrt_one_minus_abar=sqrt_one_minus_abar, noise=noise, padding_mask=padding_mask)
        return torch.empty_like(item_emb, memory_format=torch.contiguous_format)

    @torch.library.register_fake("diffrec_ext::denoiser_input_backward")
    def _(grad_out, steps, sqrt_abar, padding_mask, noised_positions, add_position):
        _same_device("grad_out", grad_out, steps=steps, sqrt_abar=sqrt_abar, padding_mask=padding_mask)
        grad_item = torch.empty_like(grad_out, memory_format=torch.contiguous_format)
        return grad_item, grad_out.new_empty(grad_out.shape[1:])

    @torch.library.register_fake("diffrec_ext::seed_avg_probs")
    def _(hidden, weight, bias, lse=None):
        _same_device("hidden", hidden, weight=weight, bias=bias, lse=lse)
        return hidden.new_empty((hidden.shape[0], weight.shape[0]), dtype=_acc(hidden.dtype))

    @torch.library.register_fake("diffrec_ext::seed_topk")
    def _(hidden, weight, bias, k, exclude_offsets, exclude_ids, lse=None):
        _same_device("hidden", hidden, weight=weight, bias=bias, exclude_offsets=exclude_offsets,
                     exclude_ids=exclude_ids, lse=lse)
        values = hidden.new_empty((hidden.shape[0], k), dtype=_acc(hidden.dtype))
        return values, hidden.new_empty((hidden.shape[0], k), dtype=torch.int64)

    @torch.library.register_fake("diffrec_ext::seed_target_rank")
    def _(hidden, weight, bias, targets, exclude_offsets, exclude_ids, lse=None):
        _same_device("hidden", hidden, weight=weight, bias=bias, targets=targets,
                     exclude_offsets=exclude_offsets, exclude_ids=exclude_ids, lse=lse)
        return hidden.new_empty((hidden.shape[0],), dtype=torch.int64)

    @torch.library.register_fake("diffrec_ext::catalog_xent")
    def _(hidden, weight, bias, targets):
        _same_device("hidden", hidden, weight=weight, bias=bias, targets=targets)
        acc = _acc(hidden.dtype)
        return hidden.new_empty((hidden.shape[0],), dtype=acc), hidden.new_empty((hidden.shape[0],), dtype=acc)

    @torch.library.register_fake("diffrec_ext::catalog_xent_backward")
    def _(grad_loss, hidden, weight, bias, targets, lse):
        _same_device("hidden", hidden, grad_loss=grad_loss, weight=weight, bias=bias, targets=targets, lse=lse)
        return (
            torch.empty_like(hidden, memory_format=torch.contiguous_format),
            torch.empty_like(weight, memory_format=torch.contiguous_format),
            weight.new_empty((weight.shape[0],)),
        )

    @torch.library.register_fake("diffrec_ext::seeded_dropout")
    def _(input, p, seed):
        return torch.empty_like(input, memory_format=torch.contiguous_format)

    def _dropout_setup(ctx, inputs, output):
        _, ctx.p, ctx.seed = inputs

    def _dropout_backward(ctx, grad_out):  # linear in the input: the same mask on the gradient
        return seeded_dropout(grad_out, ctx.p, ctx.seed), None, None

    torch.library.register_autograd("diffrec_ext::seeded_dropout", _dropout_backward, setup_context=_dropout_setup)

    def _denoiser_setup(ctx, inputs, output):
        item_emb, _, steps, sqrt_abar, sqrt_one_minus_abar, noise, padding_mask, noised_positions, add_position, _ = inputs
        ctx.save_for_backward(item_emb, steps, sqrt_abar, sqrt_one_minus_abar, noise, padding_mask)
        ctx.noised_positions = noised_positions
        ctx.add_position = add_position

    def _denoiser_backward(ctx, grad_out):
        item_emb, steps, sqrt_abar, sqrt_one_minus_abar, noise, padding_mask = ctx.saved_tensors
        k = ctx.noised_positions
        grad_item, grad_pos = _ops.denoiser_input_backward(
            grad_out.contiguous(), steps, sqrt_abar, padding_mask, k, ctx.add_position
        )
        grad_sqrt_abar = grad_sqrt_one_minus_abar = grad_noise = None
        needs = ctx.needs_input_grad
        if k > 0 and (needs[3] or needs[4] or needs[5]):  # the noised positions: a h + s eps
            acc = reference.acc_dtype(grad_out.dtype)
            g = grad_out[:, grad_out.shape[1] - k:].to(acc)
            if padding_mask is not None:
                g = g.masked_fill(padding_mask[:, -k:, None], 0.0)
            per_position = steps.dim() == 2  # [B, K]: a step per noised position
            if needs[5]:
                scale = sqrt_one_minus_abar.to(acc)[steps]
                scale = scale[:, :, None] if per_position else scale[:, None, None]
                grad_noise = (g * scale).to(noise.dtype)

            def per_step(x):  # the gradient of one table: each noised position's term at its step
                terms = (g * x.to(acc)).sum(-1)  # [B, K]
                rows, terms = (steps.reshape(-1), terms.reshape(-1)) if per_position else (steps, terms.sum(1))
                return torch.zeros_like(sqrt_abar, dtype=acc).index_add(0, rows, terms).to(sqrt_abar.dtype)

            grad_sqrt_abar = per_step(item_emb[:, item_emb.shape[1] - k:]) if needs[3] else None
            grad_sqrt_one_minus_abar = per_step(noise) if needs[4] else None
        return (grad_item, (grad_pos if ctx.add_position else None), None, grad_sqrt_abar, grad_sqrt_one_minus_abar,
                grad_noise, None, None, None, None)

    torch.library.register_autograd(
        "diffrec_ext::denoiser_input", _first_order_only("denoiser_input", _denoiser_backward),
        setup_context=_denoiser_setup,
    )

    def _xent_setup(ctx, inputs, output):
        hidden, weight, bias, targets = inputs
        ctx.save_for_backward(hidden, weight, bias, targets, output[1])
        ctx.has_bias = bias is not None

    def _xent_backward(ctx, grad_loss, grad_lse):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        if grad_loss is None and grad_lse is None:
            return None, None, None, None
        # d loss = softmax - onehot(target), d lse = softmax: the kernel computes both with the
        # weight grad_loss + grad_lse on (softmax - onehot), and lse's onehot part is added back.
        total = grad_lse if grad_loss is None else (grad_loss if grad_lse is None else grad_loss + grad_lse)
        grad_hidden, grad_weight, grad_bias = _ops.catalog_xent_backward(
            total.contiguous(), hidden, weight, bias, targets, lse
        )
        if grad_lse is not None:
            acc = lse.dtype
            present = targets >= 0
            rows = targets.clamp_min(0)
            coef = torch.where(present, grad_lse.to(acc), torch.zeros_like(lse))[:, None]
            grad_hidden = (grad_hidden.to(acc) + coef * weight[rows].to(acc)).to(hidden.dtype)
            grad_weight = grad_weight.index_add(0, rows, (coef * hidden.to(acc)).to(grad_weight.dtype))
            grad_bias = grad_bias.index_add(0, rows, coef[:, 0].to(grad_bias.dtype))
        return grad_hidden, grad_weight, (grad_bias if ctx.has_bias else None), None

    torch.library.register_autograd(
        "diffrec_ext::catalog_xent", _first_order_only("catalog_xent", _xent_backward), setup_context=_xent_setup
    )

    def _seed_probs_setup(ctx, inputs, output):
        hidden, weight, bias, lse = inputs
        ctx.save_for_backward(hidden, weight, bias, lse)

    def _seed_probs_backward(ctx, grad_probs):
        hidden, weight, bias, lse = ctx.saved_tensors
        return seed_avg_probs_backward(grad_probs, hidden, weight, bias, lse, ctx.needs_input_grad)

    torch.library.register_autograd("diffrec_ext::seed_avg_probs", _seed_probs_backward,
                                    setup_context=_seed_probs_setup)

    def _seed_topk_setup(ctx, inputs, output):
        hidden, weight, bias, _, _, _, lse = inputs
        ctx.save_for_backward(hidden, weight, bias, lse, output[1])

    def _seed_topk_backward(ctx, grad_values, _grad_ids):
        hidden, weight, bias, lse, ids = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grads = seed_topk_backward(grad_values, ids, hidden, weight, bias, lse, needs[:3] + needs[6:])
        return (*grads[:3], None, None, None, grads[3])

    torch.library.register_autograd("diffrec_ext::seed_topk", _seed_topk_backward, setup_context=_seed_topk_setup)


def _contiguous(*tensors):
    return [t.contiguous() if isinstance(t, torch.Tensor) else t for t in tensors]


def denoiser_input(item_emb, pos_emb, steps, sqrt_abar, sqrt_one_minus_abar, noise, padding_mask=None,
                   noised_positions: int = 1, add_position: bool = True, add_step: bool = True):
    """h + pos + z_n with the last `noised_positions` positions noised (see reference.denoiser_input)."""
    args = _contiguous(item_emb, pos_emb, steps, sqrt_abar, sqrt_one_minus_abar, noise, padding_mask)
    if HAVE_EXTENSION:
        return _ops.denoiser_input(*args, noised_positions, add_position, add_step)
    return reference.denoiser_input(*args, noised_positions, add_position, add_step)


def seed_avg_probs(hidden, weight, bias=None, lse=None):
    """mean over seeds of softmax(hidden @ weight.T + bias): [B, V]. For small catalogs.
    `lse` [B, S]: log-normalisers over the whole catalog when `weight` is one shard of it."""
    args = _contiguous(hidden, weight, bias, lse)
    return (_ops.seed_avg_probs if HAVE_EXTENSION else reference.seed_avg_probs)(*args)


def seed_topk(hidden, weight, bias=None, k: int = 10, exclude_offsets=None, exclude_ids=None, lse=None):
    """Exact top-k of the seed-averaged probability without a [B, S, V] tensor: (values, ids).
    On the CPU one pass with an exactness certificate answers most users (a second pass takes the
    rest); `_C.seed_topk_counts()` gives the last call's counts."""
    args = _contiguous(hidden, weight, bias)
    rest = _contiguous(exclude_offsets, exclude_ids, lse)
    return (_ops.seed_topk if HAVE_EXTENSION else reference.seed_topk)(*args, k, *rest)


def seed_target_rank(hidden, weight, bias, targets, exclude_offsets=None, exclude_ids=None, lse=None):
    """0-based pessimistic rank of each target under the seed-averaged probability: [B] int64."""
    args = _contiguous(hidden, weight, bias, targets, exclude_offsets, exclude_ids, lse)
    return (_ops.seed_target_rank if HAVE_EXTENSION else reference.seed_target_rank)(*args)


def catalog_xent(hidden, weight, bias, targets):
    """Per-row -log softmax(hidden @ weight.T + bias)[target], differentiable: (loss [B], lse [B]).
    A target of -1 marks a row whose target lies in another shard of the catalog (loss = lse)."""
    args = _contiguous(hidden, weight, bias, targets)
    return (_ops.catalog_xent if HAVE_EXTENSION else reference.catalog_xent)(*args)


def seeded_dropout(input, p: float, seed: int):
    """Dropout whose mask is a hash of (seed, element index): the same seed gives the same mask
    on every backend, and the backward pass recomputes it instead of storing it."""
    (input,) = _contiguous(input)
    return (_ops.seeded_dropout if HAVE_EXTENSION else reference.seeded_dropout)(input, float(p), int(seed))


def exclusion_csr(lists, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR (offsets, ids) from one iterable of item ids per user."""
    lists = [torch.as_tensor(list(ids), dtype=torch.int64) for ids in lists]
    counts = torch.tensor([len(ids) for ids in lists], dtype=torch.int64)
    offsets = torch.zeros(len(lists) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    ids = torch.cat(lists) if lists else torch.zeros(0, dtype=torch.int64)
    return offsets.to(device), ids.to(device)
