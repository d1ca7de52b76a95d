"""Importance sampling of diffusion steps (Eq. 18), after Nichol and Dhariwal (2021),
`LossSecondMomentResampler` of improved-diffusion.

Steps are 1..N. The sampler keeps the last `history` (10) values of L_n per step. Until every step
holds `history` values it samples uniformly; then p_n is proportional to sqrt(mean(L_n^2)) over
the stored values, mixed with uniform mass: p = p * (1 - u) + u / N, u = 0.001.

The training loss uses the weight 1 / (N p_n) (see train.py): E_{n~p}[L_n / p_n] estimates the sum
of L_n over the N steps, and dividing by N gives the scale of the uniform-sampling mean, so the
MSE term weighs the same before and after the warm-up.
"""

from __future__ import annotations

import numpy as np
import torch


class LossSecondMomentSampler:
    def __init__(self, num_steps: int, history: int = 10, uniform_prob: float = 0.001):
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
        if not isinstance(history, int) or history < 1:
            raise ValueError(f"history must be a positive int, got {history!r}")
        if not 0.0 <= uniform_prob <= 1.0:
            raise ValueError(f"uniform_prob must be in [0, 1], got {uniform_prob!r}")
        self.num_steps = num_steps
        self.history = history
        self.uniform_prob = float(uniform_prob)
        self.loss_history = np.zeros((num_steps, history), dtype=np.float64)  # row i = step i + 1
        self.counts = np.zeros(num_steps, dtype=np.int64)

    def warmed_up(self) -> bool:
        return bool((self.counts == self.history).all())

    def probabilities(self) -> np.ndarray:
        """p_n for n = 1..N, float64, sums to 1."""
        uniform = np.full(self.num_steps, 1.0 / self.num_steps)
        if not self.warmed_up():
            return uniform
        weights = np.sqrt(np.mean(self.loss_history**2, axis=1))
        total = weights.sum()
        if not np.isfinite(total) or total <= 0:
            return uniform
        probs = weights / total
        probs = probs * (1.0 - self.uniform_prob) + self.uniform_prob / self.num_steps
        return probs / probs.sum()

    def sample(self, batch: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(steps [batch] int64 in 1..N, their probabilities [batch] float64), on the CPU."""
        probs = torch.from_numpy(self.probabilities())
        index = torch.multinomial(probs, batch, replacement=True, generator=generator)
        return index + 1, probs[index]

    def update(self, steps, losses) -> None:
        """Record L_n values for their steps, in order: each step keeps its `history` most recent
        values (vectorised: one training batch brings thousands with per-position steps)."""
        steps = torch.as_tensor(steps).detach().cpu().numpy().astype(np.int64).ravel()
        losses = torch.as_tensor(losses).detach().to(torch.float64).cpu().numpy().ravel()
        if steps.shape != losses.shape:
            raise ValueError(f"steps and losses must have the same length, got {steps.shape} and {losses.shape}")
        if steps.size and (steps.min() < 1 or steps.max() > self.num_steps):
            raise ValueError(f"steps must be in [1, {self.num_steps}], got range [{steps.min()}, {steps.max()}]")
        if not steps.size:
            return
        cap = self.history
        rows = steps - 1
        order = np.argsort(rows, kind="stable")  # grouped by step, arrival order kept within a step
        rows, losses = rows[order], losses[order]
        group_start = np.searchsorted(rows, rows, side="left")
        group_size = np.bincount(rows, minlength=self.num_steps)[rows]
        arrival = np.arange(len(rows)) - group_start  # 0-based order within the step
        kept = arrival >= group_size - cap  # only the last `cap` new values of a step can survive
        rows, losses, arrival = rows[kept], losses[kept], arrival[kept]
        arrival -= (group_size[kept] - np.minimum(group_size[kept], cap))
        # Per step: keep the newest (cap - new) old values, then append the new ones, oldest first.
        new = np.bincount(rows, minlength=self.num_steps)
        old_kept = np.minimum(self.counts, cap - np.minimum(new, cap))
        shift = self.counts - old_kept  # old values dropped from the front
        columns = np.arange(cap)
        source = np.minimum(columns[None, :] + shift[:, None], cap - 1)
        history = np.take_along_axis(self.loss_history, source, axis=1)
        history[rows, old_kept[rows] + arrival] = losses
        self.counts = np.minimum(old_kept + new, cap)
        self.loss_history = np.where(columns[None, :] < self.counts[:, None], history, 0.0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "loss_history": torch.from_numpy(self.loss_history.copy()),
            "counts": torch.from_numpy(self.counts.copy()),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        history = state["loss_history"].to(torch.float64).numpy()
        counts = state["counts"].to(torch.int64).numpy()
        if history.shape != self.loss_history.shape or counts.shape != self.counts.shape:
            raise ValueError(
                f"sampler state has shape {history.shape}, expected {self.loss_history.shape}"
            )
        self.loss_history = history.copy()
        self.counts = counts.copy()
