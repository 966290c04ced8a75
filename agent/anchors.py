"""NAS anchors per base model: measured once from pilot edits on the clean weights, stored in the
ledger beside the base model, looked up whenever `nas` is on (editors.nas; arXiv 2602.02543).

Switching it on: `knowledger apply --set nas=true` (stored with the workspace's hyperparameter
overrides, like every `--set`). `nas` on with `nas_anchor` 0 (the default) means "the workspace's
anchor": `resolve(es, method, hp)` fills it in before a batch is computed, so every operation
records the ā it was anchored to in its hparams and recomputes the same way. An explicit
`--set nas_anchor=…` is a manual anchor and is used as given.

What an anchor is keyed by (ledger table `nas_anchors`): the base weights' sha256 (every lineage
of the same weights shares it: a consolidation or a same-model replay does not re-measure), the
layer L whose output the targets live at, and the site there ("block", or "mlp" for PMET). The
pilot run: editors.nas.PILOT_FACTS (20 fixed facts) with the batch's hyperparameters minus NAS,
v* optimised with MEMIT's value step (PMET's for the "mlp" site) on the BASE weights, then
`measure_anchor` (mean after dropping the norms above the 95th percentile). It is written in the
same transaction as the operation that first needed it (EditSession.commit). A new base model
(`replay --recompute --model OTHER`) has other weights: no stored anchor, so the first batch
replayed with NAS on measures it on the new model's clean weights.
"""
from __future__ import annotations

from dataclasses import dataclass

from knowledger.editors.hparams import EditHParams
from knowledger.editors.methods import get_method
from knowledger.editors.nas import PILOT_SHA256, measure_anchor, pilot_norms, pilot_requests
from knowledger.ledger import repository as repo

PILOT_METHOD = {"block": "memit", "mlp": "pmet"}  # whose v* step the pilots run, per site


@dataclass(frozen=True)
class Measured:
    """An anchor measured in this session, not yet written (EditSession.commit writes it)."""

    weights_sha256: str
    layer: int
    site: str
    norm: float
    n_pilot: int
    n_used: int
    cutoff: float
    rule: str
    pilot_norms: list[float]
    hparams: dict

    def row(self, base_model_id: int | None) -> dict:
        """add_anchor's keyword arguments."""
        return dict(weights_sha256=self.weights_sha256, base_model_id=base_model_id, layer=self.layer,
                    site=self.site, norm=self.norm, n_pilot=self.n_pilot, n_used=self.n_used,
                    cutoff=self.cutoff, rule=self.rule, pilot_norms=self.pilot_norms,
                    pilot_sha256=PILOT_SHA256, hparams=self.hparams)


def site_of(method: str) -> str:
    """Where a method's residual target z lives at layer L."""
    return "mlp" if get_method(method).optimise == "pmet" else "block"


def wants_anchor(method: str, hp) -> bool:
    return isinstance(hp, EditHParams) and get_method(method).closed_form and hp.nas and not hp.nas_anchor > 0


def measure(editor, *, progress=None):
    """ā from the pilot facts on the editor's model as it is now (the caller puts the clean
    weights in place). Returns editors.nas.Anchor and the pilot norms."""
    norms = pilot_norms(editor, pilot_requests(), progress=progress)  # (n,)
    return measure_anchor(norms), [float(x) for x in norms]


def resolve(es, method: str, hp):
    """`hp` with the workspace's anchor filled in when NAS is on without one (else `hp` itself)."""
    if not wants_anchor(method, hp):
        return hp
    live, site, layer = es.live, site_of(method), hp.v_layer
    key = (live.base_sha256, layer, site)
    found = next((m for m in es.anchors if (m.weights_sha256, m.layer, m.site) == key), None)
    if found is None:
        with es.ws.reading() as s:
            row = repo.find_anchor(s, *key)
            norm = None if row is None else float(row.norm)
        if norm is not None:
            return hp.replace(nas_anchor=norm)
        pilot_hp = hp.replace(nas=False, nas_anchor=0.0)
        editor = es.editor(PILOT_METHOD[site], pilot_hp)
        with live.at_base():
            anchor, norms = measure(editor, progress=es.progress)
        found = Measured(*key, norm=anchor.norm, n_pilot=anchor.n_pilot, n_used=anchor.n_used,
                         cutoff=anchor.cutoff, rule=anchor.rule, pilot_norms=norms, hparams=pilot_hp.to_dict())
        es.anchors.append(found)
        es.notes.append(f"NAS anchor measured on the base weights: ā = {anchor.norm:.4g} (layer {layer}, "
                        f"{anchor.n_used} of {anchor.n_pilot} pilot facts kept); targets above "
                        f"{hp.nas_max_ratio:g}ā are refused")
    return hp.replace(nas_anchor=found.norm)
