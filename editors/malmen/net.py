"""MALMEN's hyper-network (Tan, Zhang & Fu, ICLR 2024, §3.1 "hyper-network"): per layer and feature
running normalisation of [u; g], then residual low-rank blocks x + B relu(A x), each followed by a
per-layer scale and shift; lr_ℓ and λ_ℓ are learned in log space, the value shift of edit token j
is d_j = −lr_ℓ · (u_j · ũ_j) · g̃_j. B starts at zero, so an untrained network is the identity on
normalised inputs."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import HyperConfig


class RunningNorm(nn.Module):
    """Per-layer, per-feature standardisation with statistics merged batch by batch (Chan et al.).

    Until two samples have been seen it is the identity. Statistics are buffers: saved with the
    network, updated only by `update` (meta-training), never by a forward pass."""

    def __init__(self, n_layers: int, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.register_buffer("count", torch.zeros(n_layers, dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(n_layers, dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(n_layers, dim, dtype=torch.float64))

    @torch.no_grad()
    def update(self, i: int, x: torch.Tensor) -> None:
        """Merge x  # (n, dim) into layer i's statistics."""
        x = x.detach().double()
        n_b = x.shape[0]
        if n_b == 0:
            return
        mean_b = x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
        n_a = self.count[i].clone()
        n = n_a + n_b
        delta = mean_b - self.mean[i]
        self.mean[i] += delta * n_b / n
        self.m2[i] += m2_b + delta ** 2 * n_a * n_b / n
        self.count[i] = n

    def forward(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if self.count[i] < 2:
            return x
        std = (self.m2[i] / (self.count[i] - 1)).sqrt().clamp_min(self.eps)
        return (x - self.mean[i].to(x.dtype)) / std.to(x.dtype)


class LowRankBlock(nn.Module):
    """x + B relu(A x), then a per-layer scale and shift  # (n, dim) -> (n, dim)"""

    def __init__(self, dim: int, rank: int, n_layers: int):
        super().__init__()
        self.down = nn.Linear(dim, rank)
        self.up = nn.Linear(rank, dim)
        nn.init.zeros_(self.up.weight)  # identity at initialisation
        nn.init.zeros_(self.up.bias)
        self.scale = nn.Parameter(torch.ones(n_layers, dim))
        self.shift = nn.Parameter(torch.zeros(n_layers, dim))

    def forward(self, x: torch.Tensor, i: int) -> torch.Tensor:
        h = x + self.up(F.relu(self.down(x)))
        return h * self.scale[i] + self.shift[i]


class HyperNet(nn.Module):
    """[u; g] -> value shift d, per edited layer (index i into config.layers)."""

    def __init__(self, config: HyperConfig):
        super().__init__()
        self.config = config
        L, dim = len(config.layers), config.d_in + config.d_out
        self.norm = RunningNorm(L, dim)
        self.blocks = nn.ModuleList(LowRankBlock(dim, config.rank, L) for _ in range(config.n_blocks))
        self.log_lr = nn.Parameter(torch.zeros(L))  # lr_ℓ = exp(log_lr); set from data at step 0
        self.log_lambda = nn.Parameter(torch.zeros(L))  # λ_ℓ of the normal equation
        self.train_tokens: float | None = None  # mean normal-equation rows per training step (λ's batch)

    def forward(self, i: int, u: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """u (n, d_in), g (n, d_out) -> d (n, d_out)"""
        x = self.norm(i, torch.cat([u, g], -1))  # (n, d_in + d_out)
        for block in self.blocks:
            x = block(x, i)
        u_t, g_t = x.split([self.config.d_in, self.config.d_out], -1)
        return -self.log_lr[i].exp() * (u * u_t).sum(-1, keepdim=True) * g_t

    def shifts(self, i: int, u: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """forward in chunks of config.net_batch tokens  # (n, d_in), (n, d_out) -> (n, d_out)"""
        step = self.config.net_batch
        return torch.cat([self(i, u[s : s + step], g[s : s + step]) for s in range(0, len(u), step)]
                         or [u.new_zeros(0, self.config.d_out)])
