"""Consolidation: re-solve every active fact jointly against the BASE weights, from the ledger.

Sequential editing solves each batch on weights that earlier batches already moved; OTE-SE
(arXiv 2605.26670) and RLSEdit (2601.15686) show that an editor that accounts for every
accumulated constraint equals one-time editing. The ledger holds what that needs: per active fact
the target z (d,) of the last edited layer L's output at the subject's last token (v* = v₀ + δ,
anchored if NAS was on). Consolidation runs MEMIT's layer loop (Meng et al. 2023, Alg. 1; the
editors' own distribution and key pass) once over ALL those facts, starting from the base weights:

    for each edited layer l_i, ascending (the deltas of l_1..l_{i-1} already in place):
        over chunks of facts:  K, cur = keys(chunk, l_i)     # (d_in, m), (m, d) on the current weights
                               R = (z − cur)ᵀ · share(i)     # (d, m)
                               A += K Kᵀ;  B += R Kᵀ          # float64 (d_in, d_in), (d, d_in)
        ΔW_i = B (λC + αI + A)⁻¹                             # one d_in×d_in Cholesky
        apply ΔW_i (temporarily; restored bit for bit at the end)

Memory is O(d_in² + d·d_in + chunk), independent of the number of facts: 10,000+ fit. The result is
the one-batch MEMIT solve of all facts on the base weights (tested to float64 tolerance), so it is
a function of the active set alone: undoing one fact after a consolidation and consolidating again
is exact (ΔW of the other N−1, tested). α = 0 is MEMIT; α > 0 adds ENCORE's norm penalty.

Why the targets stay valid: z lives at layer L's output and no layer above L is edited, so the
blocks above L map z to the prediction exactly as when z was optimised; only the path below L
(the keys, and h at L) depends on the deltas, and consolidation recomputes that path.

Where that breaks:
- PMET: its v* was optimised with an extra, never-written change of layer L's attention output;
  the recorded MLP-part target assumes that attention change. Consolidation treats PMET facts as
  MEMIT facts with z = cur + δ_mlp (an approximation; exact only by re-optimising v* on the base).
- MALMEN and UltraEdit (editors.ultraedit): no residual target exists. Their deltas come from
  gradient-derived pseudo-values per layer, in normalised units that depended on the statistics at
  edit time, and they edit layers whose keys move when lower layers move. What the ledger holds is
  per layer (k, v) with v = (W + ΔW) k at edit time. `resolve_recorded` re-solves each layer
  jointly on those recorded pairs against the base weights (ΔW = (V − W₀K)Kᵀ(KKᵀ + αI)⁻¹, the
  RLSEdit-style joint ridge), without recomputing keys: exact for a single edited layer, an
  approximation for stacked ones (the upper layers' recorded keys go stale). The alternative is to
  leave such operations out of a consolidation and keep their deltas on top of it.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from knowledger.editors.apply import apply_deltas, restore_params, snapshot_params
from knowledger.editors.result import LayerDelta

# keys(requests, layer) -> (K (d_in, m), cur (m, d)): keys at `layer` and layer L's output, on the
# model's current weights (the editors' key pass: Editor._keys_and_current / editors.keys)
KeyFn = Callable[[Sequence, int], "tuple[torch.Tensor, torch.Tensor]"]


def editor_keys(editor) -> KeyFn:
    """The editors' key pass (context-averaged keys, layer L's output at the bare prompt)."""
    contexts = editor.contexts
    return lambda reqs, layer: editor._keys_and_current(list(reqs), layer, contexts)


def _factored(layer: int, param: str, dW: torch.Tensor) -> LayerDelta:
    """A dense ΔW (d_out, d_in) as factors of its numerical rank r (≤ the number of facts N: ΔW =
    B M⁻¹ with B = Σ R Kᵀ), from its SVD in float64 with numpy's matrix_rank tolerance. The live
    weights add a delta one rank-1 term at a time (editors.apply.compose), so rank N instead of
    min(d_out, d_in) makes every later composition of a small consolidation ~100× cheaper."""
    U, S, Vh = torch.linalg.svd(dW.to(torch.float64), full_matrices=False)  # (d_out, k), (k,), (k, d_in)
    tol = float(S.max()) * max(dW.shape) * torch.finfo(torch.float64).eps if S.numel() else 0.0
    r = max(1, int((S > tol).sum()))
    return LayerDelta(layer, param, (U[:, :r] * S[:r]).float().contiguous(), Vh[:r].T.float().contiguous())


def solve_sums(A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, lam: float, alpha: float = 0.0,
               jitter: float = 1e-10) -> torch.Tensor:
    """ΔW = B (λC + αI + A)⁻¹ in float64, by Cholesky (a relative jitter like CovSolver's).
    A (d_in, d_in) = Σ K Kᵀ, B (d_out, d_in) = Σ R Kᵀ, C (d_in, d_in) -> ΔW (d_out, d_in)"""
    M = C.to(torch.float64) * lam  # (d_in, d_in)
    M.diagonal().add_(jitter * float(M.diagonal().mean()) + alpha)
    M += A
    M = 0.5 * (M + M.T)
    L = torch.linalg.cholesky(M)  # (d_in, d_in)
    return torch.cholesky_solve(B.T.to(torch.float64), L).T  # (d_out, d_in)


def consolidate(model, spec, requests: Sequence, targets: torch.Tensor, *, layers: Sequence[int],
                keys: KeyFn, second_moments: dict[int, torch.Tensor], lam: float, alpha: float = 0.0,
                distribution=None, chunk: int = 256, progress=None,
                record: dict | None = None) -> list[LayerDelta]:
    """Per-layer deltas re-solving all `requests` jointly against the model's current weights,
    which must be the BASE weights at `layers` (the caller loads them). The model is restored.

    targets  # (N, d): z per fact, row i for requests[i] (the ledger's recorded target)
    distribution: an editors.distribute Distribution (default: MEMIT's uniform spread)
    record: if given, filled with {layer: (K (d_in, N), V (d, N))}: the keys and the values
    W₀K + R the solve used (what an operation records as request_vectors)
    """
    from knowledger.editors.distribute import get_distribution

    if len(requests) != targets.shape[0] or len(requests) == 0:
        raise ValueError(f"need one target per fact; got {len(requests)} facts, {tuple(targets.shape)} targets")
    if chunk < 1:
        raise ValueError("chunk must be ≥ 1")
    dist = distribution or get_distribution("uniform")
    layers = list(dist.layers(layers))
    z = targets.to(torch.float64)  # (N, d)
    saved = snapshot_params(model, [spec.weight_name(l) for l in layers])
    deltas: list[LayerDelta] = []
    try:
        for i, layer in enumerate(layers):
            share = dist.share(i, len(layers))
            A = B = None
            for s in range(0, len(requests), chunk):
                K, cur = keys(requests[s : s + chunk], layer)  # (d_in, m), (m, d)
                K = K.to(torch.float64)
                R = (z[s : s + chunk] - cur.to(torch.float64)).T * share  # (d, m)
                if A is None:
                    A = torch.zeros(K.shape[0], K.shape[0], dtype=torch.float64)
                    B = torch.zeros(R.shape[0], K.shape[0], dtype=torch.float64)
                A.addmm_(K, K.T)  # (d_in, d_in)
                B.addmm_(R, K.T)  # (d, d_in)
                if record is not None:
                    W = spec.to_math(spec.edited_weight(model, layer)).detach().double()  # (d, d_in)
                    Ks, Vs = record.setdefault(layer, ([], []))
                    Ks.append(K.float()), Vs.append((W @ K + R).float())
                if progress is not None:
                    progress(f"consolidate layer {layer}", min(s + chunk, len(requests)), len(requests))
            dW = solve_sums(A, B, second_moments[layer], lam, alpha)  # (d, d_in)
            delta = _factored(layer, spec.weight_name(layer), dW)
            deltas.append(delta)
            apply_deltas(model, spec, [delta])  # temporarily: the next layer's keys see it
    finally:
        restore_params(model, saved)
    if record is not None:
        for layer, (Ks, Vs) in list(record.items()):
            record[layer] = (torch.cat(Ks, 1), torch.cat(Vs, 1))  # (d_in, N), (d, N)
    return deltas


def resolve_recorded(keys: dict[int, torch.Tensor], values: dict[int, torch.Tensor],
                     base: dict[int, torch.Tensor], params: dict[int, str], alpha: float,
                     C: dict[int, torch.Tensor] | None = None, lam: float = 0.0) -> list[LayerDelta]:
    """Joint per-layer ridge on recorded (k, v) pairs (MALMEN, UltraEdit; see the module docstring).

    keys[l] (d_in, N), values[l] (d_out, N), base[l] W₀ (d_out, d_in) in the math orientation.
    ΔW = (V − W₀K) Kᵀ (λC + αI + KKᵀ)⁻¹; C optional (λ = 0 without it).
    """
    out = []
    for l in sorted(keys):
        K, V, W0 = keys[l].double(), values[l].double(), base[l].double()  # (d_in,N), (d_out,N), (d_out,d_in)
        A = K @ K.T  # (d_in, d_in)
        Cl = C[l] if C is not None else torch.zeros_like(A)
        dW = solve_sums(A, (V - W0 @ K) @ K.T, Cl, lam, alpha, jitter=0.0)
        out.append(_factored(l, params[l], dW))
    return out


# --- the operation: `knowledger consolidate` -------------------------------------------------------
# Targets. Each active fact's z is the one its newest active holder stored at apply time
# (`fact_targets`, checksummed): exactly what that solve asked of layer L. Facts without a usable
# stored z — applied before ledger revision 0007, by PMET (its z lives at L's MLP output), or at
# another layer L than the workspace's hyperparameters edit now — get z read from the LIVE weights,
# where the fact holds (layer L's output at the bare prompt), and the result says how many. The
# joint solve writes all of them at once on the base weights (MEMIT's solve with the workspace's
# hyperparameters); the operation stores the z it used for every fact, so a later consolidation,
# and undoing one fact after this one, re-solve from the same targets: the state is a function of
# the active set. A fact that was top-1 before and is not after refuses the whole operation
# (nothing written). MALMEN and UltraEdit operations are refused.
CHUNK = 256  # facts per key pass
EXACT = 1e-3  # λ scale: near the equality-constrained (EMMET-like) solve, so every target is written
SITE = "block"  # where MEMIT's z lives (agent.anchors.site_of)


def _targets(editor, hp, reqs, stored: dict) -> tuple[torch.Tensor, int, list[str]]:
    """(z (N, d) for `reqs`, how many were stored, notes): the stored targets, else layer L's
    output on the live weights."""
    use = {r.id: stored[r.id] for r in reqs
           if r.id in stored and stored[r.id].layer == hp.v_layer and stored[r.id].site == SITE}
    missing = [r for r in reqs if r.id not in use]
    live_z = {}
    if missing:
        cur = torch.cat([editor._keys_and_current(missing[i:i + CHUNK], hp.v_layer, editor.contexts)[1]
                         for i in range(0, len(missing), CHUNK)])  # (m, d) on the live weights
        live_z = {r.id: cur[j] for j, r in enumerate(missing)}
    z = torch.stack([torch.as_tensor(use[r.id].value, dtype=torch.float32) if r.id in use else live_z[r.id]
                     for r in reqs])  # (N, d)
    notes = []
    if missing:
        notes.append(f"{len(missing)} of {len(reqs)} fact(s) had no stored target at layer {hp.v_layer} "
                     f"(applied before ledger revision 0007, by PMET, or at another last layer): their "
                     f"z was read from the live weights")
    return z, len(use), notes


def _solve_record(es, live, reqs, z, before, *, hp, editor, base_model_id, why: str, metrics: dict):
    """One `consolidate` OpRecord: all `reqs` re-solved jointly on the base weights from their
    targets z (N, d), put in place on top of `live`'s current active deltas (kept as they are).
    Raises KnowledgerError, nothing recorded, if a fact top-1 in `before` is not after."""
    import time

    from knowledger.agent import recipes
    from knowledger.agent.batch import CRITERION, _norm_growth
    from knowledger.agent.errors import KnowledgerError
    from knowledger.agent.jsonutil import json_safe
    from knowledger.agent.live import ActiveDelta, factors_from_delta, stored_delta
    from knowledger.agent.records import FactOutcome, OpRecord, clean_outcome
    from knowledger.editors.evaluate import aggregate, fact_metrics
    from knowledger.ledger import repository as repo
    from knowledger.ledger.models import OperationKind, RequestOutcome, RequestStatus

    t0 = time.perf_counter()
    keep, h_before = list(live.active), live.state_hash
    live.set_active([])  # the base weights in place
    found: dict = {}
    try:
        deltas = consolidate(live.model, editor.spec, reqs, z, layers=editor.layers, keys=editor_keys(editor),
                             second_moments=editor.second_moments, lam=hp.mom2_weight * EXACT,
                             distribution=editor.distribution, chunk=CHUNK, progress=es.progress, record=found)
    finally:
        live.set_active(keep)
    seq = es.next_seq
    stored = [stored_delta(d) for d in deltas]
    live.set_active(keep + [ActiveDelta(seq, -1, d) for d in stored])
    after = fact_metrics(live.model, live.tokenizer, reqs)
    lost = [r.id for r, b, a in zip(reqs, before, after)
            if b.get(CRITERION, 0.0) >= 1.0 and a.get(CRITERION, 0.0) < 1.0]
    if lost:
        live.set_active(keep)
        raise KnowledgerError(f"consolidation would lose fact(s) {', '.join(f'#{i}' for i in lost)} "
                              f"(no longer top-1): nothing written")
    recipe = recipes.recipe_of("memit", hp, editor)
    rec = OpRecord(seq=es.take_seq(), kind=OperationKind.consolidate, base_model_id=base_model_id,
                   editor="memit", distribution=recipe.distribution, hparams=recipe.hparams, before=h_before,
                   after=live.state_hash, deltas=[factors_from_delta(d) for d in stored])
    for layer, (K, V) in found.items():  # (d_in, N), (d, N)
        for j, r in enumerate(reqs):
            rec.vectors.append(repo.FactVectors(r.id, layer, K[:, j].numpy(), V[:, j].numpy()))
    rec.targets = [repo.TargetVector(r.id, hp.v_layer, SITE, z[j].float().cpu().numpy())
                   for j, r in enumerate(reqs)]
    rec.facts = [clean_outcome(FactOutcome(r.id, RequestOutcome.applied, RequestStatus.applied,
                                           f"{why} (operation seq {seq})", dict(before=b, after=a)))
                 for r, b, a in zip(reqs, before, after)]
    es.track(rec)
    rec.timings = dict(total_s=time.perf_counter() - t0)
    rec.metrics = json_safe(dict(criterion=CRITERION, facts=len(reqs), before=aggregate(before),
                                 after=aggregate(after), norm_growth=_norm_growth(es), **metrics))
    return rec


def consolidate_workspace(ws, *, wait: bool = False, progress=None):
    """Re-solve every active fact jointly against the base weights as ONE `consolidate` operation
    of a new lineage (a new base_models row for the same weights; nothing deleted). Returns an
    agent.records.OperationsResult."""
    from knowledger.agent.errors import KnowledgerError, NothingToDo
    from knowledger.agent.live import LiveModel
    from knowledger.agent.records import edit_requests
    from knowledger.agent.session import session
    from knowledger.editors.evaluate import fact_metrics
    from knowledger.editors.methods import closed_form_names
    from knowledger.ledger import repository as repo

    with session(ws, what="consolidate", wait=wait, progress=progress) as es:
        live = es.live
        with ws.reading() as s:
            base = repo.current_base_model(s)
            active = repo.active_operations(s, base.id)
            odd = [op for op in active if op.editor is not None and op.editor not in closed_form_names()]
            if odd:
                raise KnowledgerError(f"operation seq {odd[0].seq} was made by {odd[0].editor}: consolidation "
                                      f"re-solves closed-form edits only (undo it first, or keep the history)")
            rows = [req for _, req in repo.active_facts(s, base.id)]
            stored = repo.active_targets(s, base.id, [r.id for r in rows])
            new_base = dict(name_or_path=base.name_or_path, architecture=base.architecture,
                            weights_sha256=base.weights_sha256, config=base.config_json)
        if not rows:
            raise NothingToDo("nothing to consolidate: no applied fact is in the live weights")
        hp = es.hparams()
        editor = es.editor("memit", hp)
        reqs = edit_requests(rows)
        before = fact_metrics(live.model, live.tokenizer, reqs)
        z, n_stored, notes = _targets(editor, hp, reqs, stored)
        es.notes += notes
        old_hash, old_head = live.state_hash, es.head_seq
        live.set_active([])  # the base weights in place
        new = LiveModel(live.lm, None, live.base_sha256)
        es.start_lineage(new)
        rec = _solve_record(es, new, reqs, z, before, hp=hp, editor=editor, base_model_id=None,
                            why="consolidated",
                            metrics=dict(consolidated_seq=old_head, consolidated_sha256=old_hash,
                                         operations=[op.seq for op in active],
                                         stored_targets=n_stored))
        es.commit([rec], new_base=new_base)
        return es.result([rec])


def reconsolidate_without(es, target, fact, applied):
    """Undoing one fact of consolidation `target` (agent.undo): checks, then returns the
    `reapply(rest)` that re-solves the other facts jointly on the base weights from the targets the
    consolidation stored, with its recorded hyperparameters — so the result equals consolidating
    those N−1 facts (the state is a function of the active set). `applied`: the consolidation's
    facts still applied. Evaluated now, before anything is undone (the facts' "before")."""
    from knowledger.agent.errors import KnowledgerError
    from knowledger.agent.records import edit_requests
    from knowledger.editors.evaluate import fact_metrics
    from knowledger.ledger import repository as repo

    with es.ws.reading() as s:
        stored = {t.request_id: t for t in map(repo.load_target, repo.operation_targets(s, target.id))}
    rest = [r for r in applied if r.id != fact.id]
    if rest and any(r.id not in stored for r in rest):
        raise KnowledgerError(f"consolidation seq {target.seq} stored no targets (it was made before ledger "
                              f"revision 0007): undoing one of its facts is not possible; `undo --op "
                              f"{target.seq}` undoes the whole consolidation, or consolidate again first")
    hp = es.batch_hparams("memit", target)
    editor = es.editor("memit", hp)
    reqs = edit_requests(rest)
    if any(stored[r.id].layer != hp.v_layer or stored[r.id].site != SITE for r in reqs):
        raise KnowledgerError(f"consolidation seq {target.seq}'s stored targets are not at layer {hp.v_layer}")
    z = torch.stack([torch.as_tensor(stored[r.id].value, dtype=torch.float32) for r in reqs])  # (N-1, d)
    before = fact_metrics(es.live.model, es.live.tokenizer, reqs) if reqs else []

    def reapply(_rows):  # the rest of the consolidation's facts: `reqs`, in its order
        return _solve_record(es, es.live, reqs, z, before, hp=hp, editor=editor,
                             base_model_id=es.live.base_model_id,
                             why=f"re-consolidated without fact #{fact.id}",
                             metrics=dict(reconsolidated_seq=target.seq, without=[fact.id],
                                          stored_targets=len(reqs)))
    return reapply
