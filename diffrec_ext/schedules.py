"""Noise schedules of DiffRec (section 5.3.1), computed in float64.

Every table has N + 1 entries indexed by the diffusion step n = 0..N. Entry 0 is the clean
data (abar_0 = 1, beta_0 = 0), so a step tensor can hold 0 for "no noise" and 1..N for the
forward process of Eq. 2. The sqrt and cosine schedules define their betas from a continuous
abar(t) and clip them at 0.999 as Diffusion-LM and Nichol and Dhariwal do; abar_n is then the
product of (1 - beta), which keeps it positive where the printed sqrt formula turns negative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCHEDULES = ("sqrt", "cosine", "linear")
MAX_STEPS = 10_000
BETA_CLIP = 0.999


def _betas_from_abar(abar_of_t, num_steps: int) -> torch.Tensor:
    t = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    abar = abar_of_t(t)
    return torch.clamp(1.0 - abar[1:] / abar[:-1], max=BETA_CLIP)


def betas(name: str, num_steps: int) -> torch.Tensor:
    """beta_1..beta_N of a named schedule, float64, shape [N]."""
    if not isinstance(num_steps, int) or not 1 <= num_steps <= MAX_STEPS:
        raise ValueError(f"num_steps must be an int in [1, {MAX_STEPS}], got {num_steps!r}")
    if name == "sqrt":
        return _betas_from_abar(lambda t: 1.0 - torch.sqrt(t + 1e-4), num_steps)
    if name == "cosine":
        return _betas_from_abar(
            lambda t: torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2, num_steps
        )
    if name == "linear":
        return torch.linspace(1e-4, 0.02, num_steps, dtype=torch.float64)
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}")


@dataclass(frozen=True)
class NoiseSchedule:
    """All per-step tables, float64, each of shape [N + 1] (index 0 = clean data)."""

    name: str
    num_steps: int
    beta: torch.Tensor
    alpha: torch.Tensor
    abar: torch.Tensor
    sqrt_abar: torch.Tensor
    sqrt_one_minus_abar: torch.Tensor
    # Posterior q(h^{n-1} | h^n, h^0) of Eq. 3: mean = coef_h0 * h0 + coef_hn * h^n.
    # Eq. 3 as printed has sqrt(abar_n) in coef_hn; Ho et al. and Eq. 11 have sqrt(alpha_n), used here.
    posterior_coef_h0: torch.Tensor
    posterior_coef_hn: torch.Tensor
    posterior_variance: torch.Tensor

    @classmethod
    def create(cls, name: str = "sqrt", num_steps: int = 1000) -> "NoiseSchedule":
        beta = torch.cat([torch.zeros(1, dtype=torch.float64), betas(name, num_steps)])
        alpha = 1.0 - beta
        abar = torch.cumprod(alpha, dim=0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        one_minus_abar = 1.0 - abar
        # Step 0 has no posterior; keep its coefficients as the identity (h^{-1} := h^0).
        safe = torch.where(one_minus_abar > 0, one_minus_abar, torch.ones_like(one_minus_abar))
        coef_h0 = torch.where(one_minus_abar > 0, beta * abar_prev.sqrt() / safe, torch.ones_like(beta))
        coef_hn = torch.where(
            one_minus_abar > 0, (1.0 - abar_prev) * alpha.sqrt() / safe, torch.zeros_like(beta)
        )
        variance = torch.where(one_minus_abar > 0, beta * (1.0 - abar_prev) / safe, torch.zeros_like(beta))
        return cls(
            name=name,
            num_steps=num_steps,
            beta=beta,
            alpha=alpha,
            abar=abar,
            sqrt_abar=abar.sqrt(),
            sqrt_one_minus_abar=one_minus_abar.sqrt(),
            posterior_coef_h0=coef_h0,
            posterior_coef_hn=coef_hn,
            posterior_variance=variance,
        )

    def noising_tables(self, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt_abar, sqrt_one_minus_abar) cast for the fused denoiser-input op."""
        return (
            self.sqrt_abar.to(device=device, dtype=dtype),
            self.sqrt_one_minus_abar.to(device=device, dtype=dtype),
        )
