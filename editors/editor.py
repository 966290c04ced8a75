"""Locate-then-edit editors behind one interface: MEMIT, EMMET, ROME, PMET, AlphaEdit and ENCORE.

They share everything but the solve (STYLE.md): context prefixes, target values v*
(editors.values), keys, and the spread of the residual over the edited layers (editors.distribute).

    editor = Editor(model, tokenizer, hparams, method="emmet", second_moments=C)
    result = editor.compute(requests)           # EditResult; the model is left untouched
    apply_deltas(model, editor.spec, result.deltas)

The lifelong editors take the past-edit memory (editors.memory.KeyMemory, Σ K_p K_pᵀ per layer):
`editor.compute(requests, memory=mem)`; the caller adds the result's keys to it after applying.
AlphaEdit projects onto the null space of C (cached beside the statistics, editors.stats);
ENCORE stops the v* optimisation on the most-probable criterion alone (MPES: target_new top-1 on
every prompt for `early_stop_patience` steps; the loss threshold is ignored) and adds a
Frobenius-norm penalty to MEMIT's solve.

The layer loop (MEMIT §4.3): for each edited layer l_i in ascending order, recompute the keys at
l_i and the current output of the last edited layer L with the updates of the earlier layers in
place, give l_i its share of the remaining residual z − h_L, solve, and apply temporarily. The
weights are restored bit for bit before compute() returns.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from .apply import apply_deltas, restore_params, snapshot_params
from .distribute import get_distribution
from .forward import capture, run_from
from .hooks import TraceDict
from .hparams import EditHParams
from .model_spec import spec_for
from .requests import EditRequest
from .result import EditResult, LayerDelta
from .memory import KeyMemory
from .nas import anchor_targets
from .solvers import CovSolver, alphaedit_delta, emmet_delta, encore_delta, memit_delta
from .tokens import encode_with_subject, pad_id, pad_right
from .values import context_prefixes, optimise_values

METHODS = ("memit", "emmet", "rome", "pmet", "alphaedit", "encore")
LIFELONG = ("alphaedit", "encore")  # the editors that read the past-edit memory


class Editor:
    """What consecutive batches share: the model, its spec, hyperparameters, the covariance
    factorisations (built once per layer) and the context prefixes (generated once)."""

    def __init__(self, model, tokenizer, hparams: EditHParams, *, method: str = "memit",
                 second_moments: dict[int, torch.Tensor] | None = None, weights_sha: str | None = None):
        if method not in METHODS:
            raise ValueError(f"unknown editor {method!r} (choose from {', '.join(METHODS)})")
        self.model, self.tokenizer, self.hp, self.method = model, tokenizer, hparams, method
        self.spec = spec_for(model)
        n_layers = self.spec.n_layers(model)
        if hparams.layers[-1] >= n_layers:
            raise ValueError(f"hparams.layers {hparams.layers} out of range for {n_layers} layers")
        dist = "last" if method == "rome" else hparams.distribution
        self.distribution = get_distribution(dist)
        self.layers = self.distribution.layers(hparams.layers)
        self.second_moments = second_moments or {}
        missing = [l for l in self.layers if l not in self.second_moments]
        if missing:
            raise ValueError(f"no key statistics for layer(s) {missing}")
        self._solvers: dict[int, CovSolver] = {}
        self._null: dict[int, tuple[torch.Tensor, dict]] = {}
        self._contexts: list[str] | None = None
        self._weights_sha = weights_sha  # lets the context prefixes be cached on disk

    @property
    def contexts(self) -> list[str]:
        if self._contexts is None:
            self._contexts = context_prefixes(self.model, self.tokenizer, self.hp,
                                              weights_sha=self._weights_sha)
        return self._contexts

    def solver(self, layer: int) -> CovSolver:
        if layer not in self._solvers:
            self._solvers[layer] = CovSolver(self.second_moments[layer], lam=self.hp.mom2_weight)
        return self._solvers[layer]

    def null_space(self, layer: int) -> tuple[torch.Tensor, dict]:
        """AlphaEdit's null-space basis Û (d_in, r) of layer's C, and its info (cached on disk)."""
        if layer not in self._null:
            from .stats import null_space
            self._null[layer] = null_space(self.second_moments[layer], self.hp.alphaedit_null_threshold,
                                           self.hp.alphaedit_null_scale)
        return self._null[layer]

    def _solve(self, layer: int, K, R, W, memory: KeyMemory | None):
        past = memory.get(layer) if memory is not None else None
        if self.method == "memit":
            return memit_delta(K, R, self.solver(layer), W=W)
        if self.method == "alphaedit":
            basis, info = self.null_space(layer)
            alpha = self.hp.alphaedit_l2 * info["null_mean_energy"]
            left, right, diag = alphaedit_delta(K, R, basis, alpha, memory=past, W=W)
            diag.update(null_energy=info["null_energy"])
            return left, right, diag
        if self.method == "encore":
            C = self.second_moments[layer]
            lam = self.hp.mom2_weight
            alpha = self.hp.encore_alpha * lam * float(C.diagonal().double().mean())
            return encore_delta(K, R, C, lam, alpha, memory=past, W=W)
        return emmet_delta(K, R, self.solver(layer), self.hp.emmet_ridge, W=W)

    # --------------------------------------------------------------------------------------------
    def compute(self, requests: list[EditRequest], progress: Callable | None = None, *,
                memory: KeyMemory | None = None) -> EditResult:
        """Deltas for a batch of facts. Never leaves the model changed.

        memory: the past edits' keys (lifelong editors only; others ignore it)."""
        if not requests:
            raise ValueError("no facts to edit")
        if self.method == "rome" and len(requests) != 1:
            raise ValueError("ROME edits one fact at a time; use emmet or memit for batches")
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        contexts = self.contexts
        timings["contexts_s"] = time.perf_counter() - t0

        t = time.perf_counter()
        hp = self.hp.replace(early_stop_loss=0.0) if self.method == "encore" else self.hp  # MPES
        with torch.enable_grad():
            targets = optimise_values(self.model, self.tokenizer, self.spec, requests, hp,
                                      contexts, pmet=self.method == "pmet", progress=progress)
        timings["values_s"] = time.perf_counter() - t

        names = [self.spec.weight_name(l) for l in self.layers]
        saved = snapshot_params(self.model, names)
        result = EditResult(editor=self.method, deltas=[], timings=timings,
                            value_stats=targets.stats, diagnostics={"contexts": contexts})
        timings["keys_s"] = timings["solve_s"] = 0.0
        try:
            z = None
            keys = _KeyPass(self, requests, contexts)
            for i, layer in enumerate(self.layers):
                t = time.perf_counter()
                K, cur = keys.at(layer)  # (d_in, n), (n, d)
                if z is None:
                    z = cur + targets.delta  # (n, d) target output of layer L
                    if self.hp.nas:  # norm anchors (editors.nas): refused facts ask for no change
                        anchored = anchor_targets(z, self.hp.nas_anchor, self.hp.nas_max_ratio, fallback=cur)
                        z, result.diagnostics["refused"] = anchored.values, anchored.refused
                timings["keys_s"] += time.perf_counter() - t

                t = time.perf_counter()
                R = (z - cur).T.double() * self.distribution.share(i, len(self.layers))  # (d, n)
                W = self.spec.to_math(self.spec.edited_weight(self.model, layer)).detach().double()  # (d, d_in)
                left, right, diag = self._solve(layer, K, R, W, memory)
                delta = LayerDelta(layer=layer, param=self.spec.weight_name(layer), left=left, right=right)
                result.deltas.append(delta)
                result.keys[layer] = K.float()  # (d_in, n)
                result.values[layer] = (W @ K.double() + R).float()  # (d, n)
                result.diagnostics[f"layer{layer}"] = diag
                apply_deltas(self.model, self.spec, [delta])  # temporarily: the next layer sees it
                timings["solve_s"] += time.perf_counter() - t
        finally:
            restore_params(self.model, saved)
        timings["total_s"] = time.perf_counter() - t0
        return result

    def _keys_and_current(self, requests, layer: int, contexts: list[str]):
        """Keys at `layer` (mean over context prefixes) and layer L's output at the bare prompt,
        from a fresh full pass. returns K (d_in, n), cur (n, d)"""
        return _KeyPass(self, requests, contexts).at(layer)


class _KeyPass:
    """Keys and layer L's output for the layer loop, each pass starting as high as it can.

    Editing layer l changes block l's output but not its input: so once block l's input has been
    seen, later passes start there (blocks l..L) instead of at the embeddings, and no block above
    L ever runs. Rows end at the subject's last token (causal attention: nothing after matters).
    """

    def __init__(self, editor: Editor, requests, contexts: list[str]):
        self.ed, self.n, self.c = editor, len(requests), len(contexts)
        rows, subj, bare = [], [], []
        for r in requests:
            for ci, ctx in enumerate(contexts):
                ids, s = encode_with_subject(editor.tokenizer, ctx, r.prompt, r.subject)
                if ci == 0:
                    bare.append(len(rows))
                rows.append(ids[: s + 1]); subj.append(s)
        self.batch = pad_right(rows, subj, pad_id(editor.tokenizer))
        self.bare = torch.tensor(bare)
        self.start: tuple[int, torch.Tensor] | None = None  # (block, its input (B, T, d))

    def at(self, layer: int):
        ed, spec, L = self.ed, self.ed.spec, self.ed.hp.v_layer
        if self.start is None:
            got = capture(ed.model, spec, self.batch.ids, block_inputs=[layer], block_outputs=[L],
                          mlp_out_inputs=[layer])
            key, out_L, block_in = got[f"key:{layer}"], got[f"out:{L}"], got[f"in:{layer}"]
        else:
            first, hidden = self.start
            names = [spec.mlp_out_name(layer), spec.layer(L)] + ([spec.layer(layer)] if layer > first else [])
            with torch.no_grad(), TraceDict(ed.model, names, retain_input=True) as td:
                run_from(ed.model, spec, first, hidden, end=L + 1)
            key, out_L = td[spec.mlp_out_name(layer)].input, td[spec.layer(L)].output
            block_in = td[spec.layer(layer)].input if layer > first else hidden
        self.start = (layer, block_in)
        at = torch.arange(len(self.batch.ids))
        keys = key[at, self.batch.subject_pos].double()  # (n·c, d_in)
        K = keys.view(self.n, self.c, -1).mean(1).T  # (d_in, n)
        cur = out_L[self.bare, self.batch.subject_pos[self.bare]].float()  # (n, d)
        return K, cur
