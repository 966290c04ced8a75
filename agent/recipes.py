"""What a batch is computed with — its recipe — resolved in one place.

Three kinds of editor, and this is the only module that tells them apart:
- the closed-form editors (MEMIT, EMMET, ROME, PMET, AlphaEdit, ENCORE): an `EditHParams`, from
  the workspace's preset (else the model family's) with its overrides and `stats_tokens`, or as an
  earlier operation recorded it; their editor needs key statistics and context prefixes from the
  BASE weights;
- MALMEN: a registered hyper-network (agent.hypernets.HypernetRef): the workspace's current one,
  or the one an earlier operation recorded (`artifact_id`), loaded only if its files still hash
  to the registered sha256; its editor runs on the live weights;
- UltraEdit (editors.ultraedit): the same EditHParams, of which it reads the `ultraedit_*` knobs
  over the family's preset (editors.ultraedit.hparams_for; the operation records the values that
  ran); no key statistics, no context prefixes; its editor runs on the live weights, and its
  lifelong statistics come from the ledger (agent.lifelong, set by agent.batch).

`resolve_hparams` is THE hyperparameter resolution (apply, edit, bench and the audit's token count
all call it); `Editors` caches one editor per (method, hparams) for a session.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from knowledger.agent import hypernets
from knowledger.agent.errors import KnowledgerError
from knowledger.agent.loaded import LoadedModel
from knowledger.agent.scheduler import MALMEN, ULTRAEDIT
from knowledger.editors.editor import Editor
from knowledger.editors.hparams import EditHParams, load_preset, preset_for
from knowledger.editors.methods import get_method


# --- hyperparameters -----------------------------------------------------------------------------
def resolve_hparams(model, preset: str | None = None, overrides: dict | None = None,
                    stats_tokens: int | None = None) -> EditHParams:
    """The preset (else the model family's), with `overrides` and `stats_tokens` applied; every
    value is checked by EditHParams (unknown keys, types, ranges) — nothing is stored here."""
    hp = load_preset(preset) if preset else preset_for(model)
    overrides = dict(overrides or {})
    if stats_tokens:
        overrides["stats_tokens"] = stats_tokens
    return hp.replace(**overrides) if overrides else hp


def settings_hparams(settings, model) -> EditHParams:
    """The workspace's hyperparameters (agent.scheduler.EditSettings) for `model`."""
    return resolve_hparams(model, settings.hparams_preset, settings.hparams_overrides,
                           settings.stats_tokens)


def recorded_or_settings(settings, model, recorded: dict | None = None) -> EditHParams:
    """A batch's hyperparameters: as recorded with an earlier operation, or from the settings."""
    return EditHParams.from_dict(recorded) if recorded else settings_hparams(settings, model)


def batch_hparams(ws, settings, model, method: str, op=None, *, same_weights: bool = True):
    """What a batch of `method` is computed with. MALMEN: the hyper-network `op` ran on (a recorded
    operation's facts are recomputed with it, never with a newer one), else the workspace's
    current one. The others: EditHParams, as `op` recorded them on the same weights, else from
    the settings (UltraEdit reads its ultraedit_* knobs from them)."""
    if method != MALMEN:
        return recorded_or_settings(settings, model,
                                    op.hparams_json if op is not None and same_weights else None)
    if op is not None:
        with ws.reading() as s:
            return hypernets.recorded_ref(s, op)
    lam = recorded_or_settings(settings, model, None).malmen_lambda
    with ws.reading() as s:  # the current one as this command's settings (and plan) saw it
        return hypernets.current_ref(s, settings.malmen_hypernet, lam)


# --- how an operation records its recipe ---------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    distribution: str | None
    hparams: dict
    artifact_id: int | None = None


def recipe_of(method: str, hp, editor) -> Recipe:
    """How a batch was computed, as its operation records it. MALMEN records its hyper-network
    (HyperConfig + sha256, and the artifact row), no distribution."""
    if method == MALMEN:
        return Recipe(None, dict(editor.net.config.to_dict(), hypernet_sha256=editor.sha,
                                 malmen_lambda=editor.lambda_scale),
                      hp.artifact_id)
    if method == ULTRAEDIT:  # the knobs as they ran (the family's preset filled in)
        from knowledger.editors.ultraedit import as_edit_hparams

        return Recipe(None, as_edit_hparams(hp, editor.hp).to_dict())
    return Recipe(get_method(method).distribution_for(hp), hp.to_dict())


def stats_record(method: str, hp, corpus) -> dict | None:
    """Where the key statistics came from (None for MALMEN and UltraEdit, which use none)."""
    return None if method in (MALMEN, ULTRAEDIT) else dict(corpus=corpus, tokens=hp.stats_tokens)


def ultraedit_editor(lm: LoadedModel, hp: EditHParams):
    """An UltraEditor on `lm`'s model with the ultraedit_* knobs of `hp` over the family's preset;
    its statistics are empty until the caller sets `editor.state` (the agent: from the ledger)."""
    from knowledger.editors.ultraedit import UltraEditor, hparams_for

    uhp, measured = hparams_for(lm.model, hp)
    try:
        ed = UltraEditor(lm.model, lm.tokenizer, uhp)
    except ValueError as e:  # layers out of range for this model
        raise KnowledgerError(f"ultraedit: {e}") from e
    ed.measured = measured
    return ed


# --- editors -------------------------------------------------------------------------------------
def ensure_stats(lm: LoadedModel, hp: EditHParams, corpus: str | Path | None, *, progress=None):
    """Second moments of the keys for hp.layers: from the cache, or one pass over the corpus.

    With no corpus, text sampled from the model itself (cached) stands in for one.
    """
    import time

    from knowledger.editors.stats import second_moments

    need = [l for l in hp.layers if l not in lm.stats]
    if not need:
        return lm.stats
    t = time.perf_counter()
    got = second_moments(lm.model, lm.tokenizer, need, corpus, hp.stats_tokens, dtype=hp.stats_dtype,
                         weights_sha=lm.weights_sha256, progress=progress)
    lm.stats.update(got)
    lm.stats_s += time.perf_counter() - t
    return lm.stats


class Editors:
    """The editors of one session: one per (method, hparams); MALMEN's one per (network, model).

    Closed-form editors take their key statistics and context prefixes from the BASE weights
    (`live.at_base()`); MALMEN runs on the live weights, which is what its gradients are of.
    """

    def __init__(self, ws, progress=None):
        self.ws, self.progress = ws, progress
        self._closed: dict = {}
        self._malmen: dict = {}
        self._stats_key: tuple | None = None

    def get(self, live, method: str, hp, stats_corpus):
        if method == MALMEN:
            return self.malmen(live, hp)
        if method == ULTRAEDIT:  # on the live weights (its gradients are of them); no key statistics
            key = (method, hp.to_json(), id(live.lm.model))
            if key not in self._closed:
                self._closed[key] = ultraedit_editor(live.lm, hp)
            return self._closed[key]
        key = (method, hp.to_json())
        if key not in self._closed:
            lm = live.lm
            stats_key = (stats_corpus, hp.stats_tokens, hp.stats_dtype)
            if stats_key != self._stats_key:  # other statistics: drop them and their editors
                lm.stats.clear()
                self._closed.clear()
                self._stats_key = stats_key
            with live.at_base():
                ensure_stats(lm, hp, stats_corpus, progress=self.progress)
                ed = Editor(lm.model, lm.tokenizer, hp, method=method, second_moments=lm.stats,
                            weights_sha=lm.weights_sha256)
                ed.contexts  # noqa: B018 (generated now, from the base weights)
            self._closed[key] = ed
        return self._closed[key]

    def malmen(self, live, ref: hypernets.HypernetRef):
        """A MalmenEditor on the live model with a registered hyper-network, loaded once per
        session after checking its files against the registered sha256 and its shape against
        the model."""
        from knowledger.editors.malmen import MalmenEditor

        lm = live.lm
        key = (ref.sha256, ref.lambda_scale, id(lm.model))
        if key not in self._malmen:
            net, sha = hypernets.load_verified(self.ws.location, ref)
            try:
                self._malmen[key] = MalmenEditor(lm.model, lm.tokenizer, net, sha=sha,
                                                 lambda_scale=ref.lambda_scale)
            except ValueError as e:  # editors.malmen.check_compatible
                raise KnowledgerError(f"MALMEN hyper-network {sha[:12]}: {e}") from e
        return self._malmen[key]


def direct_editor(lm: LoadedModel, method: str, hp: EditHParams, corpus=None, *, progress=None,
                  hypernet: str | os.PathLike | None = None):
    """An editor without a ledger (edit, bench): MALMEN's from a trained hyper-network folder
    (no key statistics), the others' from the statistics (computed or cached)."""
    if method == MALMEN:
        from knowledger.editors.malmen import MalmenEditor, load_hypernet

        if not hypernet:
            raise ValueError("the malmen editor needs --hypernet DIR (a folder made by `knowledger train-malmen`)")
        net, sha = load_hypernet(hypernet)
        return MalmenEditor(lm.model, lm.tokenizer, net, sha=sha, lambda_scale=hp.malmen_lambda)
    if method == ULTRAEDIT:
        return ultraedit_editor(lm, hp)
    stats = ensure_stats(lm, hp, corpus, progress=progress)
    return Editor(lm.model, lm.tokenizer, hp, method=method, second_moments=stats,
                  weights_sha=lm.weights_sha256)
