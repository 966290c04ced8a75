"""The workspace's past-edit memory in the ledger: M_ℓ = Σ k kᵀ over the keys of the active edits.

editors.memory.KeyMemory is the arithmetic; this module keeps it in step with the ledger:
- `changes(session, record)`: what one operation does to it. apply, redo, replay and heal add the
  keys they recorded (request_vectors); undo subtracts the keys its target operation recorded.
- `EditSession.commit` applies those changes in memory and, every SNAPSHOT_EVERY operations,
  saves the whole memory (6 layers x 1536² float64 = 113 MB on the default model) in the same
  transaction as the operations, stamped with the seq of the last one. Between snapshots nothing
  more is written: the operations' keys are in the ledger already (request_vectors).
- `load(session, base_model_id, head_seq)`: the stored snapshot, brought up to the head by
  replaying the changes of the weight-changing operations after it (their stored keys; an undo
  subtracts its target's), else (a workspace upgraded from schema 0002, a snapshot from the
  future of an abandoned lineage) rebuilt from the active operations' vectors: `rebuild`.
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


SNAPSHOT_EVERY = 20  # seqs between full snapshots of the memory (a load replays at most this many operations)


def load(session, base_model_id: int, head_seq: int) -> tuple[KeyMemory, bool]:
    """(memory, rebuilt): the stored snapshot brought up to `head_seq` with the changes of the
    operations after it, else rebuilt from the ledger."""
    stored = repo.load_memory(session, base_model_id)
    as_of = {m.as_of_seq for m in stored}
    if len(as_of) == 1 and (since := as_of.pop()) <= head_seq:
        memory = KeyMemory({m.layer: torch.from_numpy(np.array(m.matrix, dtype=np.float64)) for m in stored},
                           {m.layer: m.n_keys for m in stored})
        for op in repo.weight_changes(session, base_model_id, since, head_seq):
            vectors = [repo.load_vectors(v) for v in repo.operation_vectors(session, op.id)]
            apply_changes(session, memory, op.kind, vectors, op.target_operation_id)
        return memory, False
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


def save(session, base_model_id: int, memory: KeyMemory, seq: int, *, force: bool = False) -> bool:
    """Snapshot `memory` as of `seq` unless the stored snapshot is fewer than SNAPSHOT_EVERY seqs
    old (then `load` replays the operations since; force: always). True when it wrote."""
    since = repo.memory_as_of(session, base_model_id)
    if not force and since is not None and since <= seq < since + SNAPSHOT_EVERY:
        return False
    repo.save_memory(session, base_model_id, [
        repo.StoredMemory(l, memory.sums[l].cpu().numpy(), memory.counts[l], seq) for l in sorted(memory.sums)])
    return True
