"""Denoise Sequential Recommender (DSR, section 4.4 of Du et al. 2023) and its SASRec twin.

Layout of an input sequence (length T = max_len, left padded with id 0):

    [v_1, ..., v_{T-1}, slot]

`slot` is the target position. During DiffRec training it holds the target item, whose embedding
is noised at a sampled step n (Eq. 7); at inference it holds the [unk] placeholder (id
num_items + 1) noised at step N (section 4.5.2). The SASRec baseline ("the same backbone with
diffusion switched off") keeps [unk] there, clean, during training and inference, and has no step
embedding.

Item vectors live on the sphere of radius sqrt(d) by default (see `DSR.item_vectors`: it stops a
norm-growth shortcut). The embedding sum of Eq. 14 (item + position + sinusoidal step,
target-only noising) is the fused op `ops.denoiser_input`. Then LayerNorm + dropout and a pre-LN
Transformer encoder (pre-LN: LN before attention and FFN inside each residual branch, plus a final
LN; stabler than post-LN without warm-up) whose attention
is `F.scaled_dot_product_attention` with an explicit boolean mask (True = may attend): keys that
are padding are masked, every position may always attend to itself (so padded rows stay finite),
and by default attention is causal. The output at the last position, after a final LayerNorm, is
f_theta(h_n_T, n) (Eq. 16). The item layer softmax(W h + b) of Eq. 8 is a separate Linear with
V = num_items + 1 rows; row 0 is padding and is never recommended.

Causal attention makes a second, cheaper training path exact: the two-stream form
(`forward_two_stream`) supervises every position of a window in one pass. Its content stream holds
the clean items; its query stream holds, at position t, the slot token for target w_t, which
attends to the content keys before t and to itself. For the slot at position t this is the same
computation as the prefix input [w_1..w_{t-1}, slot] with causal attention (tested), except that
the slot sits at window position t instead of the last position (the usual SASRec convention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .schedules import SCHEDULES, NoiseSchedule

MODEL_KINDS = ("diffrec", "sasrec")
STEP_EMBEDDINGS = ("all", "target")
TWO_STREAM_MODES = ("window", "user")  # training modes that supervise every window position in one pass
PAD = 0


def resolve_step_embedding(step_embedding: str, mode: str) -> str:
    """A config's step_embedding with "auto" resolved: "target" for the two-stream training modes
    (which draw a step per target, so only the target can carry it), "all" (Eq. 14) otherwise."""
    if step_embedding != "auto":
        return step_embedding
    return "target" if mode in TWO_STREAM_MODES else "all"


def padding_mask_of(ids: torch.Tensor) -> torch.Tensor:
    """True where an id is padding (0)."""
    return ids == PAD


def attention_mask(padding_mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """[B, 1, T, T] bool, True = query i may attend key j: key j is not padding (and j <= i when
    causal); the diagonal is always allowed so that no row is empty."""
    batch, length = padding_mask.shape
    allowed = (~padding_mask)[:, None, None, :].expand(batch, 1, length, length)
    eye = torch.eye(length, dtype=torch.bool, device=padding_mask.device)
    if causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=padding_mask.device).tril()
    return allowed | eye


def two_stream_query_mask(padding_mask: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, 2T] bool for the query stream: content keys j < i that are not padding, then the
    query stream's own key at j = i only."""
    batch, length = padding_mask.shape
    device = padding_mask.device
    before = torch.ones(length, length, dtype=torch.bool, device=device).tril(-1)
    content = (~padding_mask)[:, None, None, :] & before
    own = torch.eye(length, dtype=torch.bool, device=device).expand(batch, 1, length, length)
    return torch.cat([content, own], dim=-1)


class SeededDropout(nn.Module):
    """nn.Dropout through the fused `ops.seeded_dropout`: each call draws a seed from torch's
    global generator (so torch.manual_seed makes a run repeatable, as with nn.Dropout) and the
    mask is a hash of (seed, element index), made in the same pass that applies it and remade by
    the backward pass instead of being stored. On the CPU it is about 3x faster than nn.Dropout,
    whose Bernoulli draws were a quarter of a training step."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p!r}")
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        seed = int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64))
        return ops.seeded_dropout(x, self.p, seed)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class EncoderLayer(nn.Module):
    """Pre-LN Transformer encoder layer: x + Drop(Attn(LN(x))), then x + Drop(FFN(LN(x))),
    FFN = Linear -> GELU -> Linear. Attention through scaled_dot_product_attention, with
    dropout on the attention weights at `attn_dropout` (default: `dropout`; on the CPU, attention
    dropout makes SDPA take its slow materialising path)."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float, attn_dropout: float | None = None):
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"dim = {dim} must be divisible by heads = {heads}")
        self.heads = heads
        self.attn_dropout = dropout if attn_dropout is None else attn_dropout
        self.ln_attn = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln_ffn = nn.LayerNorm(dim)
        self.ffn_in = nn.Linear(dim, ffn_dim)
        self.ffn_out = nn.Linear(ffn_dim, dim)
        self.drop = SeededDropout(dropout)

    # The three steps of a layer, public for the engine's shared-history cache, which runs them
    # on a cached history's keys and values and on the noised rows separately (engine.py).
    def qkv_heads(self, x: torch.Tensor):
        """Pre-LN queries, keys and values of x [B, L, d], each [B, heads, L, d / heads]."""
        batch, length, dim = x.shape
        q, k, v = self.qkv(self.ln_attn(x)).chunk(3, dim=-1)
        shape = (batch, length, self.heads, dim // self.heads)
        return [t.reshape(shape).transpose(1, 2) for t in (q, k, v)]

    def attend(self, q, k, v, mask):
        """Attention of q over (k, v) under mask, projected back to [B, L, d] (dropout in training)."""
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn_dropout if self.training else 0.0
        )
        batch, heads, length, head_dim = out.shape
        return self.drop(self.proj(out.transpose(1, 2).reshape(batch, length, heads * head_dim)))

    def feed_forward(self, x):
        """The residual feed-forward block: x + FFN(LN(x))."""
        # dropout on the branch output only (as SASRec): a mask on the 4d-wide inner activation
        # cost a third of a CPU training step and did not help on validation
        return x + self.drop(self.ffn_out(F.gelu(self.ffn_in(self.ln_ffn(x)))))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_heads(x)
        return self.feed_forward(x + self.attend(q, k, v, mask))

    def forward_two_stream(self, content, query, content_mask, query_mask, need_content: bool = True):
        qc, kc, vc = self.qkv_heads(content)
        qg, kg, vg = self.qkv_heads(query)
        query = self.feed_forward(query + self.attend(qg, torch.cat([kc, kg], 2), torch.cat([vc, vg], 2),
                                                      query_mask))
        if need_content:
            content = self.feed_forward(content + self.attend(qc, kc, vc, content_mask))
        return content, query


def _check_dsr_arguments(kind, num_items, max_len, schedule, step_embedding, noised_positions) -> None:
    if kind not in MODEL_KINDS:
        raise ValueError(f"model kind must be one of {MODEL_KINDS}, got {kind!r}")
    if not isinstance(num_items, int) or num_items < 1:
        raise ValueError(f"num_items must be a positive int, got {num_items!r}")
    if not isinstance(max_len, int) or max_len < 2:
        raise ValueError(f"max_len must be an int >= 2 (history + target slot), got {max_len!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if step_embedding not in STEP_EMBEDDINGS:
        raise ValueError(f"step_embedding must be one of {STEP_EMBEDDINGS}, got {step_embedding!r}")
    if kind == "diffrec" and not 1 <= noised_positions <= max_len:
        raise ValueError(f"noised_positions must be in [1, max_len = {max_len}], got {noised_positions}")


class DSR(nn.Module):
    """Denoise Sequential Recommender; `kind="sasrec"` is the same backbone without diffusion."""

    def __init__(
        self,
        num_items: int,
        max_len: int = 50,
        dim: int = 256,
        layers: int = 2,
        heads: int = 2,
        dropout: float = 0.2,
        ffn_mult: int = 4,
        attn_dropout: float | None = None,
        emb_scale: float = 50.0,
        norm_embeddings: bool = True,
        schedule: str = "sqrt",
        num_steps: int = 1000,
        noised_positions: int = 1,
        add_position: bool = True,
        add_step: bool = True,
        causal: bool = True,
        kind: str = "diffrec",
        input_scale: float = 1.0,
        step_embedding: str = "all",
        tie_output: bool = False,
    ):
        super().__init__()
        _check_dsr_arguments(kind, num_items, max_len, schedule, step_embedding, noised_positions)
        diffusion = kind == "diffrec"
        self.kind = kind
        self.num_items = num_items
        self.unk_id = num_items + 1
        self.max_len = max_len
        self.dim = dim
        self.causal = causal
        self.add_position = add_position
        # SASRec: no noise anywhere, no step embedding.
        self.noised_positions = noised_positions if diffusion else 0
        self.add_step = add_step if diffusion else False
        # "all": z_n at every position (Eq. 14); "target": at the noised positions only, each with
        # its own step (the form in which two-stream training draws a step per target).
        self.step_embedding = step_embedding
        self.schedule = NoiseSchedule.create(schedule, num_steps)
        self.num_steps = num_steps
        # Input scaling (Chen 2023, "On the importance of noise scheduling for diffusion models"):
        # the forward process runs on input_scale * h0, h_n = sqrt(abar_n) b h0 + sqrt(1 - abar_n) eps,
        # which lowers the signal-to-noise ratio of every step by b (b = 1: the paper). The op's
        # signal table is therefore b * sqrt(abar_n); f_theta still predicts h0 itself.
        if not float(input_scale) > 0:
            raise ValueError(f"input_scale must be > 0, got {input_scale!r}")
        self.input_scale = float(input_scale)
        sqrt_abar, sqrt_one_minus = self.schedule.noising_tables()
        self.register_buffer("sqrt_abar", sqrt_abar * self.input_scale, persistent=False)
        self.register_buffer("sqrt_one_minus_abar", sqrt_one_minus, persistent=False)

        # Stored tables start at std 1 / emb_scale; see reset_parameters and item_vectors.
        self.emb_scale = float(emb_scale)
        if not self.emb_scale > 0:
            raise ValueError(f"emb_scale must be > 0, got {emb_scale!r}")
        self.norm_embeddings = bool(norm_embeddings)
        self.item_emb = nn.Embedding(num_items + 2, dim, padding_idx=PAD)  # + padding, + [unk]
        self.pos_emb = nn.Parameter(torch.empty(max_len, dim))
        self.input_ln = nn.LayerNorm(dim)
        self.input_drop = SeededDropout(dropout)
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, ffn_mult * dim, dropout, attn_dropout) for _ in range(layers))
        self.final_ln = nn.LayerNorm(dim)
        # Eq. 8, softmax(W h + b) with V = num_items + 1 rows (row 0 = padding): W is its own
        # matrix, or with tie_output the effective item embeddings E themselves (as in SASRec).
        self.tie_output = bool(tie_output)
        if self.tie_output:
            self.out_bias = nn.Parameter(torch.zeros(num_items + 1))
        else:
            self.out = nn.Linear(dim, num_items + 1)
        # Alg. 2 feeds h_n to the slot as it is: the denoiser input's tables of "no noise".
        self.register_buffer("no_signal_change", torch.ones_like(sqrt_abar), persistent=False)
        self.register_buffer("no_noise", torch.zeros_like(sqrt_one_minus), persistent=False)
        self.reset_parameters()

    @property
    def diffusion(self) -> bool:
        return self.kind == "diffrec"

    @property
    def catalog_size(self) -> int:
        """V = num_items + 1 rows of the item layer (row 0 = padding)."""
        return self.num_items + 1

    def reset_parameters(self):
        # Effective item and position embeddings have unit scale per dimension: the scale the
        # Gaussian noise of Eq. 7 assumes for the data, the scale of the sinusoidal step embedding
        # (which drowns smaller item embeddings: measured), and the scale of the final LayerNorm's
        # output that regresses onto them. The tables are stored at std 1 / emb_scale (0.02 by
        # default, the SASRec / BERT init), so that Adam's fixed-size steps are large relative to
        # the stored values and the tables learn at the speed of the usual small-init tables.
        nn.init.normal_(self.item_emb.weight, std=1.0 / self.emb_scale)
        with torch.no_grad():
            self.item_emb.weight[PAD].zero_()
        nn.init.normal_(self.pos_emb, std=1.0 / self.emb_scale)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    # ----------------------------------------------------------------- inputs
    def build_input(self, history: torch.Tensor, slot: torch.Tensor | int | None = None) -> torch.Tensor:
        """[B, T] ids = the last T - 1 items of a left-padded `history` [B, H] followed by `slot`
        ([B] ids, or one id; default [unk]). Shorter histories are left padded."""
        if history.dim() != 2:
            raise ValueError(f"history must be [B, H], got shape {tuple(history.shape)}")
        batch = history.shape[0]
        keep = self.max_len - 1
        history = history[:, -keep:] if history.shape[1] >= keep else F.pad(history, (keep - history.shape[1], 0))
        if slot is None:
            slot = self.unk_id
        slot = torch.as_tensor(slot, dtype=history.dtype, device=history.device).expand(batch)
        return torch.cat([history, slot[:, None]], dim=1)

    def _check_ids(self, ids: torch.Tensor):
        if ids.dim() != 2 or ids.shape[1] != self.max_len:
            raise ValueError(f"ids must be [B, T = {self.max_len}], got shape {tuple(ids.shape)}")
        if ids.dtype != torch.int64:
            raise ValueError(f"ids must be int64, got {ids.dtype}")

    def _steps(self, steps, batch: int, device) -> torch.Tensor:
        """[B] steps (or [B, K] per noised position) from None (step 0), one int or a tensor."""
        if steps is None:
            return torch.zeros(batch, dtype=torch.int64, device=device)
        steps = torch.as_tensor(steps, dtype=torch.int64, device=device)
        return steps.expand(batch) if steps.dim() == 0 else steps

    def item_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """Effective item embeddings E[v] = h0 (Eq. 6), [..., d].

        norm_embeddings (default): sqrt(d) * P[v] / ||P[v]||, every item on the sphere of radius
        sqrt(d) (unit scale per dimension). Without it, emb_scale * P[v]: then nothing bounds the
        norms, and DiffRec learns to grow them so that the noised target of Eq. 7 stays readable
        through the noise at every step (measured: |E| 5.7 -> 23 in 30 epochs, L_rec falling by
        copying the target while validation NDCG falls); the fixed radius keeps the signal-to-noise
        ratio of step n where the schedule puts it. Padding stays the zero vector."""
        if self.norm_embeddings:
            return F.normalize(self.item_emb(ids), dim=-1) * self.dim**0.5
        return self.item_emb(ids) * self.emb_scale

    def embed(self, ids, steps, noise=None, padding_mask=None, noised_positions=None, item_emb=None,
              tables=None):
        """Eq. 14 through the fused op, then LayerNorm and dropout. `steps` [B] or, per noised
        position, [B, K]. `item_emb` overrides the looked-up embeddings and `tables` the
        (signal, noise) scale tables (the reverse process feeds h_n as it is)."""
        batch, length = ids.shape
        k = self.noised_positions if noised_positions is None else noised_positions
        emb = self.item_vectors(ids) if item_emb is None else item_emb
        if noise is None or k == 0:
            if k > 0:
                raise ValueError("noise [B, K, d] is required when positions are noised")
            noise = emb.new_zeros(batch, 0, self.dim)
        if self.step_embedding == "target" and steps.dim() == 1:
            steps = steps[:, None].expand(batch, k)
        signal, noise_scale = tables if tables is not None else (self.sqrt_abar, self.sqrt_one_minus_abar)
        x = ops.denoiser_input(
            emb, self.pos_emb * self.emb_scale, steps, signal, noise_scale, noise, padding_mask,
            k, self.add_position, self.add_step,
        )
        return self.input_drop(self.input_ln(x))

    # ----------------------------------------------------------------- passes
    def encode(self, x: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask(padding_mask, self.causal)
        for layer in self.layers:
            x = layer(x, mask)
        return self.final_ln(x)

    def forward(self, ids: torch.Tensor, steps=None, noise: torch.Tensor | None = None,
                padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """f_theta at the last position, [B, d]. `ids` [B, T] end with the slot; `steps` [B] (or
        one int) in [0, N]; `noise` [B, K, d] for the last K = noised_positions positions."""
        self._check_ids(ids)
        if padding_mask is None:
            padding_mask = padding_mask_of(ids)
        steps = self._steps(steps, ids.shape[0], ids.device)
        x = self.embed(ids, steps, noise, padding_mask)
        return self.encode(x, padding_mask)[:, -1]

    def forward_from_hidden(self, ids: torch.Tensor, steps, last_hidden: torch.Tensor,
                            padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """f_theta(h_n, n) with the slot's representation given directly as `last_hidden` [B, d]
        (already noised: no noise is added), for the reverse process of Alg. 2."""
        self._check_ids(ids)
        if padding_mask is None:
            padding_mask = padding_mask_of(ids)
        steps = self._steps(steps, ids.shape[0], ids.device)
        emb = self.item_vectors(ids)
        emb = torch.cat([emb[:, :-1], last_hidden.to(emb.dtype)[:, None]], dim=1)
        # the slot is the "noised" position (its step embedding goes there) with tables that
        # leave it as it is
        as_is = torch.zeros(ids.shape[0], 1, self.dim, dtype=emb.dtype, device=emb.device)
        x = self.embed(ids, steps, as_is, padding_mask, noised_positions=1, item_emb=emb,
                       tables=(self.no_signal_change, self.no_noise))
        return self.encode(x, padding_mask)[:, -1]

    def forward_two_stream(self, windows: torch.Tensor, steps=None, noise: torch.Tensor | None = None,
                           padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Outputs for every position of left-padded windows [B, T] in one pass, [B, T, d]: row t is
        f_theta for target windows[:, t] given windows[:, :t], noised at its own step steps[:, t]
        (`steps` [B, T], `noise` [B, T, d]; DiffRec only). Needs causal attention,
        noised_positions = 1 and, for DiffRec, step_embedding = "target" (the clean history is
        shared by targets at different steps, so it carries no step embedding)."""
        if not self.causal:
            raise ValueError("two-stream (window, user mode) training needs causal attention")
        if self.noised_positions > 1:
            raise ValueError("two-stream (window, user mode) training noises the target only (noised_positions = 1)")
        if self.diffusion and self.step_embedding != "target":
            raise ValueError("two-stream (window, user mode) training draws a step per target: it needs "
                             "step_embedding = 'target'")
        self._check_ids(windows)
        if padding_mask is None:
            padding_mask = padding_mask_of(windows)
        batch, length = windows.shape
        no_steps = self._steps(None, batch, windows.device)
        content = self.embed(windows, no_steps, None, padding_mask, noised_positions=0)
        if self.diffusion:
            if noise is None or steps is None:
                raise ValueError("steps [B, T] and noise [B, T, d] are required for DiffRec")
            query = self.embed(windows, self._steps(steps, batch, windows.device), noise, padding_mask,
                               noised_positions=length)
        else:
            query = self.embed(torch.full_like(windows, self.unk_id), no_steps, None, padding_mask, noised_positions=0)
        content_mask = attention_mask(padding_mask, causal=True)
        query_mask = two_stream_query_mask(padding_mask)
        for index, layer in enumerate(self.layers):
            content, query = layer.forward_two_stream(
                content, query, content_mask, query_mask, need_content=index + 1 < len(self.layers)
            )
        return self.final_ln(query)

    # ----------------------------------------------------------------- item layer
    def item_layer(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W [V, d], b [V]) of the item layer softmax(W h + b) (Eq. 8); with tie_output W is the
        effective item embeddings divided by sqrt(d) (row 0, padding, is zero). The division keeps
        the initial logits at unit scale, as for a scaled dot product: E's rows have norm sqrt(d)
        and so has h (a LayerNorm output), and logits h . E_v of std ~sqrt(d) saturated the
        softmax (measured: validation NDCG@10 0.018 against 0.087 untied after 2 ML-1M epochs)."""
        if self.tie_output:
            ids = torch.arange(self.catalog_size, device=self.out_bias.device)
            return self.item_vectors(ids) / self.dim**0.5, self.out_bias
        return self.out.weight, self.out.bias


def embedding_statistics(model: DSR) -> dict[str, float]:
    """The training log's watch on the item vectors: "item_emb_norm", the mean L2 norm of the real
    items' effective embeddings; "item_emb_cos", the mean cosine similarity over all pairs of
    distinct real items (near 0 when spread out, near 1 when they collapse onto one direction);
    "out_weight_norm", the mean norm of the item layer's real rows."""
    with torch.no_grad():
        ids = torch.arange(1, model.num_items + 1, device=model.item_emb.weight.device)
        norm = float(model.item_vectors(ids).norm(dim=1).mean())
        units = F.normalize(model.item_emb.weight[1 : model.num_items + 1].double(), dim=1)
        n = units.shape[0]
        cosine = float((units.sum(0).pow(2).sum() - n) / (n * (n - 1))) if n >= 2 else 0.0
        out_norm = float(model.item_layer()[0][1:].norm(dim=1).mean())
    return {"item_emb_norm": norm, "item_emb_cos": cosine, "out_weight_norm": out_norm}


def build_model(config, num_items: int) -> DSR:
    """The DSR a TrainConfig (config.py) describes, for a catalog of `num_items` items."""
    return DSR(
        num_items=num_items, max_len=config.max_len, dim=config.dim, layers=config.layers, heads=config.heads,
        dropout=config.dropout, ffn_mult=config.ffn_mult, attn_dropout=config.attn_dropout,
        emb_scale=config.emb_scale, norm_embeddings=config.norm_embeddings, schedule=config.schedule,
        num_steps=config.num_steps,
        noised_positions=config.noised_positions, add_position=config.add_position, add_step=config.add_step,
        causal=config.causal, kind=config.kind, input_scale=config.input_scale,
        step_embedding=config.resolved_step_embedding, tie_output=config.tie_output,
    )
