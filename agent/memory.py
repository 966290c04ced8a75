"""The workspace's past-edit memory in the ledger: M_ℓ = Σ k kᵀ over the keys of the active edits.

editors.memory.KeyMemory is the arithmetic; this module keeps it in step with the ledger:
- `changes(session, record)`: what one operation does to it. apply, redo, replay and heal add the
  keys they recorded (request_vectors); undo subtracts the keys its target operation recorded.
- `EditSession.commit` applies those changes and saves the memory in the same transaction as the
  operations (agent.operations), stamped with the seq of the last one.
- `load(session, base_model_id, head_seq)`: the stored memory when it reflects the head, else
  (a workspace upgraded from schema 0002, a memory written by an interrupted command) rebuilt from
  the active operations' vectors: `rebuild`.
Keys are stored as float32 vectors; the sums are float64, so add-then-subtract returns to the
memory of the surviving keys up to float64 rounding (tests/agent/test_memory.py).
"""
from __future__ import annotations

import numpy as np
import torch

from knowledger.editors.memory import KeyMemory
from knowledger.ledger import repository as repo
from knowledger.ledger.models import OperationKind


def keys_by_layer(vectors) -> dict[int, torch.Tensor]:
    """{layer: K (d_in, n)} from FactVectors rows."""
    cols: dict[int, list[np.ndarray]] = {}
    for v in vectors:
        cols.setdefault(v.layer, []).append(np.asarray(v.key, dtype=np.float64))
    return {l: torch.from_numpy(np.stack(ks, axis=1)) for l, ks in sorted(cols.items())}


def rebuild(session, base_model_id: int) -> KeyMemory:
    """The memory from scratch: the keys of every active operation of the lineage."""
    return KeyMemory.from_keys({l: [K] for l, K in keys_by_layer(repo.active_vectors(session, base_model_id)).items()})


def load(session, base_model_id: int, head_seq: int) -> tuple[KeyMemory, bool]:
    """(memory, rebuilt): the stored one if it reflects `head_seq`, else rebuilt from the ledger."""
    stored = repo.load_memory(session, base_model_id)
    if stored and all(m.as_of_seq == head_seq for m in stored):
        return KeyMemory({m.layer: torch.from_numpy(np.array(m.matrix, dtype=np.float64)) for m in stored},
                         {m.layer: m.n_keys for m in stored}), False
    if not stored and head_seq == 0:
        return KeyMemory(), False
    return rebuild(session, base_model_id), True


def apply_changes(session, memory: KeyMemory, kind: OperationKind, vectors, target_operation_id: int | None) -> None:
    """Update `memory` in place for one committed operation that changed the weights."""
    if kind == OperationKind.undo:
        if target_operation_id is not None:
            memory.remove(keys_by_layer(repo.load_vectors(v)
                                        for v in repo.operation_vectors(session, target_operation_id)))
    elif vectors:
        memory.add(keys_by_layer(vectors))


def save(session, base_model_id: int, memory: KeyMemory, seq: int) -> None:
    repo.save_memory(session, base_model_id, [
        repo.StoredMemory(l, memory.sums[l].cpu().numpy(), memory.counts[l], seq) for l in sorted(memory.sums)])
