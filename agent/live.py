"""The live model: the base weights plus the ledger's active deltas, and its snapshot on disk.

Definition (what makes undo and replay exact). For every parameter p touched by an active delta,

    W_p = cast_to_dtype_of_p( W_base,p in float64 + Σ over active operations in seq order of ΔW )

where each ΔW = left @ rightᵀ is accumulated one rank-one outer product at a time in float64
(elementwise multiply and add only: no BLAS reduction whose order could depend on the thread
count). The live weights are therefore a pure function of the set of active operations: undoing
the last operation, or replaying the ledger in another process, reproduces earlier weights bit
for bit. Parameters no delta touches keep their base values.

The weights hash (`state_hash`) is cheap and exact: sha256 over "knowledger-state/1", the base
model's weights sha256, and for each touched parameter in sorted order its name and the sha256 of
its bytes (editors.apply.weight_sha256). With no active delta it is the hash of the base alone.
Every operation records it as `weights_sha256_after`; the latest one is the ledger's *head*.

The snapshot, `<workspace home>/<db name>.live.safetensors`, holds only the touched parameters
and, as metadata, the format, the base model's sha256, the head seq and the state hash. It is
written to a temporary file, fsynced and renamed into place. On opening, it is used only if its
state hash equals the ledger head's and its tensors hash to it; otherwise (missing, corrupt, stale
after a crash between the ledger commit and the snapshot) the live model is rebuilt from the base
weights and the deltas, and the caller is told why. Delta blobs are checked against their sha256
before use (IntegrityError names the corrupt one); a base model whose weights hash differs from
the ledger's record is refused.

A damaged ledger is never trusted (issue 15). The snapshot also records, per active operation, a
digest of the deltas it was built from (`delta_digests`: layer, parameter name, shapes, factor
bytes); it is used only if the ledger's active deltas have the same digests, which costs one pass
of sha256 over the factors (already read to check their blob sha256). Otherwise the weights are
rebuilt from the base and the deltas and must hash to the head's recorded weights hash; when they
do not (a `layer_deltas` row deleted, two rows' parameter names swapped with their checksums still
valid), every command that opens the live model refuses in one line naming the first operation
whose recorded hash its deltas do not reproduce, before computing or writing anything.
"""
from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as st_load, save as st_save

from knowledger.agent.loaded import LoadedModel, open_model
from knowledger.agent.lock import LockTarget, fault_point, lock_target
from knowledger.agent.workspace import Location, Workspace
from knowledger.editors.apply import cast_checked, compose, restore_params, weight_sha256
from knowledger.editors.fileio import atomic_write_bytes
from knowledger.editors.result import LayerDelta
from knowledger.ledger import repository as repo
from knowledger.ledger.errors import IntegrityError, KnowledgerError
from knowledger.ledger.models import OperationKind

SNAPSHOT_FORMAT = "knowledger-live/1"
_STATE_TAG = b"knowledger-state/1\n"


def state_hash(base_sha256: str, param_shas: dict[str, str]) -> str:
    """The weights hash of a state: base hash + (name, sha256) of each touched parameter."""
    h = hashlib.sha256(_STATE_TAG)
    h.update(f"base {base_sha256}\n".encode())
    for name in sorted(param_shas):
        h.update(f"{name} {param_shas[name]}\n".encode())
    return h.hexdigest()


def _workspace_file(loc: Location, suffix: str) -> Path:
    stem = loc.sqlite_file.stem if loc.sqlite_file is not None else "ledger"
    return loc.home / f"{stem}.{suffix}"


def snapshot_path(loc: Location) -> Path:
    return _workspace_file(loc, "live.safetensors")


def lock_path(loc: Location) -> LockTarget:
    """The workspace lock (agent.lock.lock_target): `<db name>.lock` beside a SQLite database, a
    PostgreSQL advisory lock for a PostgreSQL ledger."""
    return lock_target(loc)


# --- deltas between the ledger (numpy) and the editors (torch) ----------------------------------
@dataclass(frozen=True)
class ActiveDelta:
    """One stored delta in effect: its operation's seq and id, and the factors."""

    seq: int
    operation_id: int
    delta: LayerDelta


def delta_from_factors(f: repo.DeltaFactors) -> LayerDelta:
    return LayerDelta(layer=f.layer, param=f.param, left=torch.from_numpy(np.array(f.left)),
                      right=torch.from_numpy(np.array(f.right)))


def delta_digests(active: list[ActiveDelta]) -> dict[str, str]:
    """Per operation seq (as a string): sha256 over its deltas' layer, parameter name, shapes and
    factor bytes, independent of their order. What the snapshot records it was built from, so a
    ledger whose rows were deleted, added, renamed or swapped since is noticed when it is opened."""
    per_op: dict[int, list[str]] = {}
    for a in active:
        d = a.delta
        left, right = d.left.detach().contiguous(), d.right.detach().contiguous()  # (d_out, r), (d_in, r)
        h = hashlib.sha256(f"{d.layer} {d.param} {str(left.dtype)} {tuple(left.shape)} "
                           f"{tuple(right.shape)}\n".encode())
        h.update(left.reshape(-1).view(torch.uint8).numpy())
        h.update(right.reshape(-1).view(torch.uint8).numpy())
        per_op.setdefault(a.seq, []).append(h.hexdigest())
    return {str(seq): hashlib.sha256(" ".join(sorted(hs)).encode()).hexdigest()
            for seq, hs in sorted(per_op.items())}


def factors_from_delta(d: LayerDelta) -> repo.DeltaFactors:
    """float32 numpy factors: what the ledger stores, and what the live model then uses."""
    as_np = lambda t: np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy())  # noqa: E731
    return repo.DeltaFactors(layer=d.layer, param=d.param, left=as_np(d.left), right=as_np(d.right))


def stored_delta(d: LayerDelta) -> LayerDelta:
    """The delta exactly as it will be read back from the ledger (float32 factors)."""
    return delta_from_factors(factors_from_delta(d))


# --- the live model -------------------------------------------------------------------------------
@dataclass
class LiveModel:
    """A loaded base model whose touched parameters hold base + active deltas."""

    lm: LoadedModel
    base_model_id: int
    base_sha256: str
    active: list[ActiveDelta] = field(default_factory=list)
    param_shas: dict[str, str] = field(default_factory=dict)  # touched parameter -> sha256
    _base: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # base values
    _acc: dict[str, tuple[tuple[LayerDelta, ...], torch.Tensor]] = field(default_factory=dict, repr=False)

    @property
    def model(self):
        return self.lm.model

    @property
    def tokenizer(self):
        return self.lm.tokenizer

    @property
    def state_hash(self) -> str:
        return state_hash(self.base_sha256, self.param_shas)

    def _base_value(self, name: str) -> torch.Tensor:
        """The base value of a parameter (captured before knowledger first writes it)."""
        if name not in self._base:
            self._base[name] = self.model.get_parameter(name).detach().clone()
        return self._base[name]

    def _accumulate(self, name: str, deltas: list[ActiveDelta]) -> torch.Tensor:
        """W_base + Σ ΔW in float64 (stored layout); continues a cached prefix when it can."""
        keys = tuple(a.delta for a in deltas)  # compared by identity: a retry reuses a seq
        cached = self._acc.get(name)
        if cached is not None and len(cached[0]) <= len(keys) and all(
                x is y for x, y in zip(cached[0], keys)):
            start, acc = len(cached[0]), cached[1]
        else:
            start, acc = 0, self._base_value(name)
        acc = compose(acc, [a.delta for a in deltas[start:]], self.lm.spec)  # editors.apply, float64
        self._acc[name] = (keys, acc)
        return acc

    def compose(self, active: list[ActiveDelta]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The touched parameters' values for an active set, and their sha256; writes nothing."""
        by_param: dict[str, list[ActiveDelta]] = {}
        for a in sorted(active, key=lambda a: a.seq):
            by_param.setdefault(a.delta.param, []).append(a)
        values, shas = {}, {}
        for name, deltas in by_param.items():
            base = self._base_value(name)
            value = cast_checked(name, self._accumulate(name, deltas), base.dtype)
            values[name], shas[name] = value, weight_sha256(value)
        return values, shas

    def hash_of(self, active: list[ActiveDelta]) -> str:
        return state_hash(self.base_sha256, self.compose(active)[1])

    def set_active(self, active: list[ActiveDelta]) -> str:
        """Make the weights base + `active` (parameters no longer touched go back to base)."""
        values, shas = self.compose(active)
        writes = dict(values)
        for name in self.param_shas:
            if name not in writes:
                writes[name] = self._base[name]
        restore_params(self.model, writes)  # editors.apply: the one weight writer
        self.active, self.param_shas = sorted(active, key=lambda a: a.seq), shas
        return self.state_hash

    def load_snapshot_tensors(self, tensors: dict[str, torch.Tensor], active: list[ActiveDelta]) -> None:
        for name in tensors:
            self._base_value(name)
        restore_params(self.model, tensors)
        self.active = sorted(active, key=lambda a: a.seq)
        self.param_shas = {name: weight_sha256(t) for name, t in tensors.items()}

    def norm_growth(self) -> dict[str, float]:
        """‖W − W_base‖_F / ‖W_base‖_F of every touched parameter (the scheduler's drift signal)."""
        from knowledger.editors.health import weight_norms

        cur = {name: self.model.get_parameter(name) for name in sorted(self.param_shas)}
        return {name: v["delta_rel"] for name, v in weight_norms(cur, {n: self._base[n] for n in cur}).items()}

    def touched_tensors(self) -> dict[str, torch.Tensor]:
        return {name: self.model.get_parameter(name).detach().clone() for name in sorted(self.param_shas)}

    @contextmanager
    def at_base(self):
        """The base weights in place for the duration (key statistics, context prefixes)."""
        if not self.param_shas:
            yield
            return
        saved = self.touched_tensors()
        restore_params(self.model, {name: self._base[name] for name in saved})
        try:
            yield
        finally:
            restore_params(self.model, saved)

    def write_snapshot(self, path: Path, head_seq: int) -> None:
        meta = dict(format=SNAPSHOT_FORMAT, base_sha256=self.base_sha256, head_seq=str(head_seq),
                    state_sha256=self.state_hash, params=json.dumps(sorted(self.param_shas)),
                    deltas=json.dumps(delta_digests(self.active), sort_keys=True))
        write_snapshot(path, self.touched_tensors(), meta, root=path.parent)


# --- the snapshot file ----------------------------------------------------------------------------
def write_snapshot(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str],
                   root: Path | None = None) -> None:
    """Write atomically (editors.fileio: temp file beside `path`, fsync, 0644, rename, fsync the
    directory), never through a symlink, and with `root` never outside it."""
    data = st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta)
    atomic_write_bytes(path, data, root=root, halfway=lambda: fault_point("mid-snapshot-write"))


def remove_stale_temporaries(path: Path) -> int:
    """Delete temporary snapshot files a killed process left behind; returns how many."""
    n = 0
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        tmp.unlink(missing_ok=True)
        n += 1
    return n


def read_snapshot(path: Path, *, base_sha256: str, expected_state: str, params: set[str],
                  digests: dict[str, str] | None = None) -> tuple[dict[str, torch.Tensor] | None, str]:
    """(tensors, "") for a snapshot that matches the ledger, else (None, why it was not used).

    With `digests` (delta_digests of the ledger's active deltas) the snapshot must also have been
    built from exactly those deltas."""
    if not path.is_file():
        return None, f"{path.name} is missing"
    try:
        raw = path.read_bytes()
        tensors = st_load(raw)
        header_len = int.from_bytes(raw[:8], "little")
        meta = json.loads(raw[8:8 + header_len]).get("__metadata__") or {}
    except Exception as e:  # safetensors and json raise their own types on corrupt bytes
        return None, f"{path.name} is corrupt ({str(e).splitlines()[0][:80]})"
    if meta.get("format") != SNAPSHOT_FORMAT:
        return None, f"{path.name} has an unknown format {meta.get('format')!r}"
    if meta.get("base_sha256") != base_sha256:
        return None, f"{path.name} belongs to another base model"
    shas = {name: weight_sha256(t) for name, t in tensors.items()}
    if state_hash(base_sha256, shas) != meta.get("state_sha256"):
        return None, f"{path.name} is corrupt (its tensors do not hash to its recorded state)"
    if meta.get("state_sha256") != expected_state or set(tensors) != params:
        return None, (f"{path.name} is stale (state {str(meta.get('state_sha256'))[:12]}… at seq "
                      f"{meta.get('head_seq')}, the ledger head is {expected_state[:12]}…)")
    if digests is not None:
        try:
            built_from = json.loads(meta.get("deltas") or "null")
        except ValueError:
            built_from = None
        if not isinstance(built_from, dict):
            return None, f"{path.name} does not record the deltas it was built from"
        differ = sorted((set(built_from) ^ set(digests)) | {k for k in digests if built_from.get(k) != digests[k]},
                        key=int)
        if differ:
            return None, (f"{path.name} was built from other deltas than the ledger holds for operation "
                          f"seq {differ[0]}")
    return tensors, ""


# --- opening ---------------------------------------------------------------------------------------
def read_active(session, base_model_id: int, *, up_to_seq: int | None = None) -> list[ActiveDelta]:
    """The active deltas of a base model's lineage, each blob checked against its sha256."""
    out = []
    for op in repo.active_operations(session, base_model_id, up_to_seq=up_to_seq):
        for row in repo.operation_deltas(session, op.id):
            out.append(ActiveDelta(op.seq, op.id, delta_from_factors(repo.load_delta(row))))
    return out


def expected_state(session, base) -> tuple[str, int]:
    """(the head's weights hash, its seq); the base alone's hash and 0 with no operation yet."""
    head = repo.head_operation(session, base.id)
    if head is None:
        return state_hash(base.weights_sha256, {}), 0
    return head.weights_sha256_after, head.seq


def load_base(name_or_path: str, weights_sha256: str) -> LoadedModel:
    """The base model, verified against the ledger's record of its weights."""
    try:
        lm = open_model(name_or_path)
    except OSError as e:
        raise KnowledgerError(f"cannot load the base model {name_or_path}: {e}") from e
    if lm.weights_sha256 != weights_sha256:
        raise IntegrityError(f"base model {name_or_path} has weights sha256 {lm.weights_sha256[:12]}…, "
                             f"the ledger recorded {weights_sha256[:12]}…: refusing to edit another model")
    return lm


def open_live(ws: Workspace, *, refresh: bool, notes: list[str] | None = None) -> tuple[LiveModel, int]:
    """The live model and the head seq it corresponds to.

    refresh: write a rebuilt snapshot (the caller holds the workspace lock). Why a snapshot was
    not used is appended to `notes`.
    """
    notes = notes if notes is not None else []
    with ws.reading() as s:
        base = repo.current_base_model(s)
        if base is None:
            raise KnowledgerError("the workspace has no base model: run `knowledger init`")
        want, head_seq = expected_state(s, base)
        active = read_active(s, base.id)
        base_id, name, base_sha = base.id, base.name_or_path, base.weights_sha256
    live = LiveModel(load_base(name, base_sha), base_id, base_sha)
    path = snapshot_path(ws.location)
    params = {a.delta.param for a in active}
    tensors, why = read_snapshot(path, base_sha256=base_sha, expected_state=want, params=params,
                                 digests=delta_digests(active))
    if tensors is not None:
        live.load_snapshot_tensors(tensors, active)
        return live, head_seq
    try:
        got = live.set_active(active)
    except _REBUILD_ERRORS as e:  # e.g. a row renamed to a parameter of another shape
        got = f"(none: {' '.join(str(e).split())[:120]})"
    if got != want:
        raise IntegrityError(damage_report(ws, live, head_seq, want, got))
    if active or path.exists():  # a fresh workspace has no snapshot yet: nothing to say
        notes.append(f"live snapshot not used: {why}; rebuilt from the base model and "
                     f"{len({a.operation_id for a in active})} active operation(s)")
    if refresh:
        live.write_snapshot(path, head_seq)
    return live, head_seq


_REBUILD_ERRORS = (RuntimeError, ValueError, AttributeError, KeyError, IndexError)


def damage_report(ws: Workspace, live: LiveModel, head_seq: int, want: str, got: str) -> str:
    """One line naming the first operation whose recorded weights hash the ledger's deltas do not
    reproduce (the way `replay` checks), for a ledger that does not rebuild to its head."""
    first = None
    with ws.reading() as s:
        active: list[ActiveDelta] = []
        for op in repo.lineage(s, live.base_model_id):
            if op.kind in repo.DELTA_KINDS:
                active += [ActiveDelta(op.seq, op.id, delta_from_factors(repo.load_delta(row)))
                           for row in repo.operation_deltas(s, op.id)]
            elif op.kind == OperationKind.undo:
                active = [a for a in active if a.operation_id != op.target_operation_id]
            if op.weights_sha256_after is None:
                continue
            try:
                ok = live.hash_of(active) == op.weights_sha256_after
            except _REBUILD_ERRORS:
                ok = False
            if not ok:
                first = (op.seq, op.kind.value)
                break
    where = (f"operation seq {first[0]} ({first[1]})" if first else f"the head (seq {head_seq})")
    return (f"the ledger is damaged at {where}: its stored deltas do not rebuild the weights it "
            f"recorded (head seq {head_seq}: {want[:12]}…, rebuilt: {got[:12]}…); refusing to use or "
            f"extend them, nothing was written (`knowledger replay` lists every mismatch)")
