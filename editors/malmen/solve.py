"""MALMEN's aggregation (Tan, Zhang & Fu, ICLR 2024, eq. 4, the normal equation): the value shifts D
(n, d_out) of all edit tokens become one update per layer,
    S_ℓ = (UᵀU + e^{λ_ℓ} I)⁻¹ UᵀD,   ΔW_ℓ = S_ℓᵀ          U (n, d_in), D (n, d_out),
from running sums, so any number of tokens fits in memory."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Normal:
    """Running sums of the normal equation for one layer: UᵀU (d_in, d_in), UᵀD (d_in, d_out), ‖D‖²."""

    utu: torch.Tensor
    utd: torch.Tensor
    dd: float = 0.0
    n: int = 0

    @classmethod
    def empty(cls, d_in: int, d_out: int) -> "Normal":
        return cls(torch.zeros(d_in, d_in, dtype=torch.float64), torch.zeros(d_in, d_out, dtype=torch.float64))

    def add(self, u: torch.Tensor, d: torch.Tensor) -> None:
        u, d = u.detach().double(), d.detach().double()
        self.utu += u.T @ u
        self.utd += u.T @ d
        self.dd += float((d * d).sum())
        self.n += len(u)

    def matrix(self, log_lambda: float) -> torch.Tensor:
        """UᵀU + e^λ I  # (d_in, d_in)"""
        return self.utu + torch.eye(len(self.utu), dtype=torch.float64) * math.exp(float(log_lambda))

    def factor(self, log_lambda: float) -> torch.Tensor:
        """The Cholesky factor of UᵀU + e^λ I (SPD for any λ), for torch.cholesky_solve  # (d_in, d_in)"""
        return torch.linalg.cholesky(self.matrix(log_lambda))

    def solve(self, log_lambda: float) -> torch.Tensor:
        """S = (UᵀU + e^λ I)⁻¹ UᵀD  # (d_in, d_out), float64"""
        return torch.cholesky_solve(self.utd, self.factor(log_lambda))

    def residual(self, S: torch.Tensor) -> float:
        """‖US − D‖ / ‖D‖ without U: ‖US‖² − 2⟨US, D⟩ + ‖D‖² = tr(SᵀUᵀUS) − 2 tr(SᵀUᵀD) + ‖D‖²"""
        if self.dd <= 0:
            return 0.0
        sq = float((S * (self.utu @ S)).sum() - 2 * (S * self.utd).sum()) + self.dd
        return max(sq, 0.0) ** 0.5 / self.dd ** 0.5


def aggregate(u: torch.Tensor, d: torch.Tensor, log_lambda: float) -> torch.Tensor:
    """The normal equation for one layer in one go  # u (n, d_in), d (n, d_out) -> S (d_in, d_out)"""
    acc = Normal.empty(u.shape[1], d.shape[1])
    acc.add(u, d)
    return acc.solve(log_lambda)


def factor(S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ΔW = Sᵀ as LayerDelta factors (left (d_out, r), right (d_in, r)) of rank r ≤ min(d_in, d_out):
    a thin QR of S (d_in, d_out) = Q R gives ΔW = Rᵀ Qᵀ, i.e. left = Rᵀ, right = Q."""
    if S.shape[0] >= S.shape[1]:
        Q, R = torch.linalg.qr(S)  # (d_in, d_out), (d_out, d_out)
        return R.T.contiguous(), Q
    return S.T.contiguous(), torch.eye(S.shape[0], dtype=S.dtype)
