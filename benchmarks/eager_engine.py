"""The plain PyTorch baseline the inference engine is measured against (benchmarks/bench_inference.py)
and tested beside (tests/test_engine.py): the same model, B * S full sequences per denoiser pass, the
embedding sum from `reference.denoiser_input`, the scores as logits [B * S, V] -> softmax -> mean
over seeds -> topk. No shared history, no padding trimmed, no sorting, no graphs, no fused ops."""

from __future__ import annotations

import torch

from diffrec_ext import reference
from diffrec_ext.engine import EngineBase, repeat_rows, slot_steps, StepPlan
from diffrec_ext.model import padding_mask_of


class _EagerPass:
    """The baseline: rows * S full sequences in plain PyTorch (embedding sum from the reference
    twin, then the model's own LayerNorm and encoder), nothing shared between seeds."""

    def __init__(self, engine: EagerEngine, ids: torch.Tensor, seeds: int):
        self.model, self.engine = engine.model, engine
        self.sequences = repeat_rows(ids, seeds)
        self.padding = padding_mask_of(self.sequences)
        self.vectors = self.model.item_vectors(self.sequences)
        self.slot_vectors = self.vectors[:, -1]

    def _encode(self, vectors, steps, noise, noised_positions, tables=None):
        model = self.model
        table, table_noise = tables or self.engine.noising_tables
        x = reference.denoiser_input(vectors, self.engine.position_table, slot_steps(model, steps, noised_positions),
                                     table, table_noise, noise, self.padding, noised_positions, model.add_position,
                                     model.add_step)
        return model.encode(model.input_drop(model.input_ln(x)), self.padding)[:, -1]

    def one_pass(self, noise, plan: StepPlan) -> torch.Tensor:
        noised = self.model.noised_positions
        if not noised:
            noise = self.vectors.new_zeros(self.vectors.shape[0], 0, self.model.dim)
        return self._encode(self.vectors, plan.seq_steps[0], noise, noised)

    def denoise_slot(self, h, step: int, plan: StepPlan) -> torch.Tensor:
        vectors = torch.cat([self.vectors[:, :-1], h.to(self.vectors.dtype)[:, None]], dim=1)
        as_is = vectors.new_zeros(vectors.shape[0], 1, self.model.dim)  # the slot, left as it is
        return self._encode(vectors, plan.seq_steps[step], as_is, 1, self.engine.identity_tables)


class EagerEngine(EngineBase):
    """The plain PyTorch baseline (see the module docstring)."""

    name = "eager"

    def _make_pass(self, ids, seeds):
        return _EagerPass(self, ids, seeds)

    def _score(self, hidden, k, offsets, excluded):
        users, seeds, dim = hidden.shape
        logits = torch.nn.functional.linear(hidden.reshape(users * seeds, dim), *self.model.item_layer())
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32).reshape(users, seeds, -1).mean(dim=1)
        rows = torch.repeat_interleave(torch.arange(users, device=hidden.device), offsets[1:] - offsets[:-1])
        probs[rows, excluded] = float("-inf")
        return torch.topk(probs, k, dim=-1)

