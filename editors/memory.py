"""Past-edit memory: per edited layer, M_ℓ = Σ_p k_p k_pᵀ over the keys of every active edit.

The lifelong editors (AlphaEdit, ENCORE) keep earlier edits in place by adding M_ℓ to the
matrix they solve against: a new update is asked to leave W k_p unchanged for every past key k_p,
as it is asked to for the corpus keys behind C. Plain tensors, no database: the agent persists a
memory in the ledger (agent.memory) and the benchmark keeps one in memory.

    mem = KeyMemory.empty({3: 1536, 4: 1536})
    mem.add({3: K3, 4: K4})       # after applying a batch: K_ℓ (d_in, n), one key per fact
    mem.remove({3: K3, 4: K4})    # after undoing it
    mem[3]                        # (d_in, d_in) float64, symmetric
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class KeyMemory:
    sums: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (d_in, d_in) float64
    counts: dict[int, int] = field(default_factory=dict)  # layer -> number of keys in the sum

    @classmethod
    def empty(cls, widths: dict[int, int]) -> "KeyMemory":
        return cls({l: torch.zeros(d, d, dtype=torch.float64) for l, d in widths.items()},
                   {l: 0 for l in widths})

    @classmethod
    def from_keys(cls, keys: dict[int, list[torch.Tensor]], widths: dict[int, int] | None = None) -> "KeyMemory":
        """Built from scratch: keys[ℓ] a list of (d_in, n_i) blocks (the reference for tests)."""
        mem = cls.empty(widths or {l: int(ks[0].shape[0]) for l, ks in keys.items() if ks})
        for layer, blocks in keys.items():
            for K in blocks:
                mem.add({layer: K})
        return mem

    def __getitem__(self, layer: int) -> torch.Tensor:
        return self.sums[layer]

    def get(self, layer: int) -> torch.Tensor | None:
        return self.sums.get(layer)

    def _update(self, keys: dict[int, torch.Tensor], sign: float) -> None:
        for layer, K in keys.items():
            K64 = K.detach().to(torch.float64)  # (d_in, n)
            if layer not in self.sums:
                self.sums[layer] = torch.zeros(K64.shape[0], K64.shape[0], dtype=torch.float64)
                self.counts[layer] = 0
            S = self.sums[layer]
            if K64.shape[0] != S.shape[0]:
                raise ValueError(f"layer {layer}: keys have d_in={K64.shape[0]}, memory is {S.shape[0]}")
            S.addmm_(K64.to(S.device), K64.T.to(S.device), alpha=sign)  # += sign · K Kᵀ
            self.counts[layer] += int(sign) * K64.shape[1]
            if self.counts[layer] < 0:
                raise ValueError(f"layer {layer}: removed more keys than the memory holds")

    def add(self, keys: dict[int, torch.Tensor]) -> None:
        """M_ℓ += K_ℓ K_ℓᵀ for each layer ℓ in keys (K_ℓ (d_in, n))."""
        self._update(keys, 1.0)

    def remove(self, keys: dict[int, torch.Tensor]) -> None:
        """M_ℓ −= K_ℓ K_ℓᵀ: the exact inverse of add (up to float64 rounding)."""
        self._update(keys, -1.0)

    def copy(self) -> "KeyMemory":
        return KeyMemory({l: s.clone() for l, s in self.sums.items()}, dict(self.counts))

    @property
    def n_keys(self) -> int:
        return max(self.counts.values(), default=0)
