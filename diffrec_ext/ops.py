"""Python face of the compiled ops: fake (meta) kernels for torch.compile, autograd, and thin
wrappers that fall back to the pure-PyTorch twins in `reference` when the extension is missing.

Every op has the same name in four places: its schema in python/registration.cpp, its CPU kernel
in csrc/cpu/, its CUDA kernel in csrc/cuda/, and its twin in diffrec_ext/reference.py.
"""

from __future__ import annotations

import torch

from . import reference

try:
    from . import _C  # noqa: F401  (loading it registers torch.ops.diffrec_ext.*)

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
        _, _, steps, sqrt_abar, _, _, padding_mask, noised_positions, add_position, _ = inputs
        ctx.save_for_backward(steps, sqrt_abar, padding_mask)
        ctx.noised_positions = noised_positions
        ctx.add_position = add_position

    def _denoiser_backward(ctx, grad_out):
        steps, sqrt_abar, padding_mask = ctx.saved_tensors
        grad_item, grad_pos = _ops.denoiser_input_backward(
            grad_out.contiguous(), steps, sqrt_abar, padding_mask, ctx.noised_positions, ctx.add_position
        )
        return grad_item, (grad_pos if ctx.add_position else None), None, None, None, None, None, None, None, None

    torch.library.register_autograd(
        "diffrec_ext::denoiser_input", _denoiser_backward, setup_context=_denoiser_setup
    )

    def _xent_setup(ctx, inputs, output):
        hidden, weight, bias, targets = inputs
        ctx.save_for_backward(hidden, weight, bias, targets, output[1])
        ctx.has_bias = bias is not None

    def _xent_backward(ctx, grad_loss, _grad_lse):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        if grad_loss is None:
            return None, None, None, None
        grad_hidden, grad_weight, grad_bias = _ops.catalog_xent_backward(
            grad_loss.contiguous(), hidden, weight, bias, targets, lse
        )
        return grad_hidden, grad_weight, (grad_bias if ctx.has_bias else None), None

    torch.library.register_autograd("diffrec_ext::catalog_xent", _xent_backward, setup_context=_xent_setup)


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
    """Exact top-k of the seed-averaged probability without a [B, S, V] tensor: (values, ids)."""
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
