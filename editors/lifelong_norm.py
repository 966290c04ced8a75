"""Lifelong normalisation: running per-dimension mean and variance that are never reset.

UltraEdit (arXiv 2505.14679) and StableEdit (2605.11836) normalise each edited module's
z = [k ‖ g] (layer input ‖ output gradient) with statistics over EVERY row of every batch the
editor has applied: they are a function of the applied history, and their drift is what keeps the
pseudo-values, and so the updates, bounded over millions of edits.

Arithmetic (float64 throughout): per layer a count n, a mean μ (D,) and M2 = Σ (z − μ)² (D,).
- `BatchMoments.of(rows)`: one batch's own (n_b, μ_b, M2_b), two-pass (exact for the batch).
- `LifelongStats.update(batch)`: Chan et al.'s parallel merge (1979), Welford's update for many
  rows at once: n = n_a + n_b, δ = μ_b − μ_a, μ = μ_a + δ n_b/n, M2 = M2_a + M2_b + δ² n_a n_b/n.
- `LifelongStats.remove(batch)`: its exact algebraic inverse: n_a = n − n_b,
  μ_a = (n μ − n_b μ_b)/n_a, δ = μ_b − μ_a, M2_a = M2 − M2_b − δ² n_a n_b/n.
  So undo is exact (to float64 rounding) given the undone batch's moments; the ledger must keep
  each operation's BatchMoments (2·D + 1 numbers per layer). Rebuilding from the surviving
  batches in order (`rebuild`) gives the same state; that equality is the test.

Both return a NEW object; nothing is mutated, so an operation that fails leaves the state as it
was. What undo does NOT do: batches applied after the undone one were computed with statistics
that included it; their deltas stay as recorded (unless the agent rebases and recomputes them).
`to_tensors()` / `from_tensors()` give a flat {name: tensor} dict for safetensors blobs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Moments:
    n: int
    mean: torch.Tensor  # (D,) float64
    m2: torch.Tensor  # (D,) float64: Σ (z − mean)²

    @classmethod
    def of(cls, rows: torch.Tensor) -> "Moments":
        z = rows.detach().to(torch.float64)  # (m, D)
        if z.ndim != 2 or z.shape[0] == 0:
            raise ValueError(f"need rows (m ≥ 1, D); got {tuple(z.shape)}")
        mean = z.mean(0)  # (D,)
        return cls(int(z.shape[0]), mean, ((z - mean) ** 2).sum(0))

    def merge(self, b: "Moments") -> "Moments":
        if self.n == 0:
            return b
        n = self.n + b.n
        delta = b.mean - self.mean  # (D,)
        return Moments(n, self.mean + delta * (b.n / n), self.m2 + b.m2 + delta ** 2 * (self.n * b.n / n))

    def unmerge(self, b: "Moments") -> "Moments":
        if b.n > self.n:
            raise ValueError(f"cannot remove {b.n} rows from statistics over {self.n}")
        na = self.n - b.n
        if na == 0:
            return Moments(0, torch.zeros_like(self.mean), torch.zeros_like(self.m2))
        mean_a = (self.mean * self.n - b.mean * b.n) / na  # (D,)
        delta = b.mean - mean_a
        m2 = self.m2 - b.m2 - delta ** 2 * (na * b.n / self.n)
        return Moments(na, mean_a, m2.clamp(min=0.0))  # clamp: rounding can dip below 0


@dataclass(frozen=True)
class BatchMoments:
    """One batch's moments per layer: what an operation must record for an exact undo."""

    layers: dict[int, Moments] = field(default_factory=dict)

    @classmethod
    def of(cls, rows: dict[int, torch.Tensor]) -> "BatchMoments":
        return cls({l: Moments.of(z) for l, z in sorted(rows.items())})

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return _flat(self.layers)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "BatchMoments":
        return cls(_unflat(tensors))


@dataclass(frozen=True)
class LifelongStats:
    """The never-reset statistics of every edited layer."""

    layers: dict[int, Moments] = field(default_factory=dict)

    def update(self, batch: BatchMoments | dict[int, torch.Tensor]) -> "LifelongStats":
        """A new state with the batch merged in (rows (m, D) per layer, or their moments)."""
        b = batch if isinstance(batch, BatchMoments) else BatchMoments.of(batch)
        out = dict(self.layers)
        for l, m in b.layers.items():
            if l in out and out[l].mean.shape != m.mean.shape:
                raise ValueError(f"layer {l}: rows have D={m.mean.numel()}, statistics {out[l].mean.numel()}")
            out[l] = out[l].merge(m) if l in out else m
        return LifelongStats(out)

    def remove(self, batch: BatchMoments) -> "LifelongStats":
        """A new state without the batch: the exact inverse of `update(batch)`."""
        out = dict(self.layers)
        for l, m in batch.layers.items():
            if l not in out:
                raise ValueError(f"layer {l} has no statistics to remove a batch from")
            out[l] = out[l].unmerge(m)
        return LifelongStats(out)

    @classmethod
    def rebuild(cls, batches) -> "LifelongStats":
        """From scratch, merging the surviving batches' moments in order."""
        state = cls()
        for b in batches:
            state = state.update(b)
        return state

    def count(self, layer: int) -> int:
        return self.layers[layer].n if layer in self.layers else 0

    def normalise(self, layer: int, z: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
        """(z − μ) / σ with the population σ = sqrt(M2/n), floored at eps. z (m, D) -> (m, D) float64"""
        m = self.layers[layer]
        std = (m.m2 / max(m.n, 1)).sqrt().clamp(min=eps)  # (D,)
        return (z.to(torch.float64) - m.mean) / std

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return _flat(self.layers)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "LifelongStats":
        return cls(_unflat(tensors))


def _flat(layers: dict[int, Moments]) -> dict[str, torch.Tensor]:
    out = {}
    for l, m in sorted(layers.items()):
        out[f"{l}.n"] = torch.tensor([m.n], dtype=torch.int64)
        out[f"{l}.mean"], out[f"{l}.m2"] = m.mean.contiguous(), m.m2.contiguous()
    return out


def _unflat(tensors: dict[str, torch.Tensor]) -> dict[int, Moments]:
    layers = sorted({int(k.split(".")[0]) for k in tensors})
    return {l: Moments(int(tensors[f"{l}.n"][0]), tensors[f"{l}.mean"].to(torch.float64),
                       tensors[f"{l}.m2"].to(torch.float64)) for l in layers}
