"""Locate-then-edit editors behind one interface: MEMIT, EMMET, ROME, PMET, AlphaEdit and ENCORE.

They share everything but the solve (STYLE.md): context prefixes, target values v*
(editors.values), keys, and the spread of the residual over the edited layers (editors.distribute).
What differs per method is one entry of the table in editors.methods: its v* optimisation, its
solve, its layer spreading, its batch limit, whether it reads the past-edit memory and when v*
stops. An unknown method name is an error.

    editor = Editor(model, tokenizer, hparams, method="emmet", second_moments=C)
    result = editor.compute(requests)           # EditResult; the model is left untouched
    apply_deltas(model, editor.spec, result.deltas)

The lifelong editors take the past-edit memory (editors.memory.KeyMemory, Σ K_p K_pᵀ per layer):
`editor.compute(requests, memory=mem)`; the caller adds the result's keys to it after applying.

The layer loop (MEMIT §4.3, Alg. 1): for each edited layer l_i in ascending order, recompute the
keys at l_i and the current output of the last edited layer L with the updates of the earlier
layers in place, give l_i its share of the remaining residual z − h_L (PMET: z − m_L, at L's MLP
output), solve, and apply temporarily. The weights are restored bit for bit before compute() returns.
"""
from __future__ import annotations

import time
from typing import Sequence

import torch

from .apply import apply_deltas, restore_params, snapshot_params
from .distribute import get_distribution
from .forward import capture, model_device, run_from
from .hooks import TraceDict
from .hparams import EditHParams
from .model_spec import spec_for
from .requests import EditRequest
from .result import EditResult, LayerDelta
from .memory import KeyMemory
from .methods import SolveInputs, closed_form_names, get_method, lifelong_names
from .progress import Progress, report
from .solvers import CovSolver
from .nas import anchor_targets
from .tokens import encode_with_subject, pad_id, pad_right
from .values import context_prefixes, optimise_values

METHODS = closed_form_names()  # what this class computes (editors.methods holds the table)
LIFELONG = lifelong_names()  # the editors that read the past-edit memory


class Editor:
    """What consecutive batches share: the model, its spec, hyperparameters, the covariance
    factorisations (built once per layer) and the context prefixes (generated once)."""

    def __init__(self, model, tokenizer, hparams: EditHParams, *, method: str = "memit",
                 second_moments: dict[int, torch.Tensor] | None = None, weights_sha: str | None = None):
        self.m = get_method(method)  # UnknownMethod for a name the table lacks
        if not self.m.closed_form:
            raise ValueError(f"{method} is not a closed-form editor (MALMEN: editors.malmen.MalmenEditor)")
        self.model, self.tokenizer, self.hp, self.method = model, tokenizer, hparams, method
        self.reads_memory = self.m.reads_memory
        self.spec = spec_for(model)
        n_layers = self.spec.n_layers(model)
        if hparams.layers[-1] >= n_layers:
            raise ValueError(f"hparams.layers {hparams.layers} out of range for {n_layers} layers")
        self.distribution = get_distribution(self.m.distribution_for(hparams))
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

    # --------------------------------------------------------------------------------------------
    def compute(self, requests: Sequence[EditRequest], *, memory: KeyMemory | None = None,
                progress: Progress | None = None) -> EditResult:
        """Deltas for a batch of facts. Never leaves the model changed.

        memory: the past edits' keys (read by the methods whose entry says reads_memory).
        progress: progress("values", facts done, facts), then ("keys", layers done, layers)."""
        requests = list(requests)
        self.m.check_batch(len(requests))
        if self.hp.nas and not self.hp.nas_anchor > 0:
            raise ValueError("hparams.nas is on but no nas_anchor is given: a workspace measures and looks "
                             "it up itself (agent.anchors); elsewhere pass nas_anchor (editors.nas.measure_anchor)")
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        contexts = self.contexts
        timings["contexts_s"] = time.perf_counter() - t0

        t = time.perf_counter()
        pmet = self.m.optimise == "pmet"
        with torch.enable_grad():
            targets = optimise_values(self.model, self.tokenizer, self.spec, requests,
                                      self.m.value_hparams(self.hp), contexts, pmet=pmet, progress=progress)
        timings["values_s"] = time.perf_counter() - t
        timings.update({f"values_{k}": v for k, v in targets.timings.items()})  # values_prefix_s, values_steps_s

        names = [self.spec.weight_name(l) for l in self.layers]
        saved = snapshot_params(self.model, names)
        result = EditResult(editor=self.method, deltas=[], timings=timings,
                            value_stats=targets.stats, diagnostics={"contexts": contexts})
        timings["keys_s"] = timings["solve_s"] = 0.0
        try:
            z = None
            keys = _KeyPass(self, requests, contexts, at_mlp=pmet)
            past_of = memory.get if memory is not None and self.reads_memory else (lambda layer: None)
            report(progress, "keys", 0, len(self.layers))
            for i, layer in enumerate(self.layers):
                t = time.perf_counter()
                K, cur = keys.at(layer)  # (d_in, n), (n, d) output of layer L (PMET: of its MLP)
                if z is None:
                    z = cur + targets.delta  # (n, d) target output of layer L (PMET: of its MLP)
                    if self.hp.nas:  # norm anchors (editors.nas): refused facts ask for no change
                        anchored = anchor_targets(z, self.hp.nas_anchor, self.hp.nas_max_ratio, fallback=cur)
                        z, result.diagnostics["refused"] = anchored.values, anchored.refused
                    result.targets, result.target_layer = z.float(), self.hp.v_layer  # (n, d)
                    result.target_site = "mlp" if pmet else "block"
                timings["keys_s"] += time.perf_counter() - t

                t = time.perf_counter()
                R = (z - cur).T.double() * self.distribution.share(i, len(self.layers))  # (d, n)
                W = self.spec.to_math(self.spec.edited_weight(self.model, layer)).detach().double()  # (d, d_in)
                left, right, diag = self.m.solve(SolveInputs(self, layer, K, R, W, past_of(layer)))
                delta = LayerDelta(layer=layer, param=self.spec.weight_name(layer), left=left, right=right)
                result.deltas.append(delta)
                result.keys[layer] = K.float()  # (d_in, n)
                result.values[layer] = (W @ K.double() + R).float()  # (d, n)
                result.diagnostics[f"layer{layer}"] = diag
                apply_deltas(self.model, self.spec, [delta])  # temporarily: the next layer sees it
                timings["solve_s"] += time.perf_counter() - t
                report(progress, "keys", i + 1, len(self.layers))
        finally:
            restore_params(self.model, saved)
        timings["total_s"] = time.perf_counter() - t0
        return result

    def _keys_and_current(self, requests, layer: int, contexts: list[str]):
        """Keys at `layer` (mean over context prefixes) and layer L's output at the bare prompt,
        from a fresh full pass. returns K (d_in, n), cur (n, d)"""
        return _KeyPass(self, requests, contexts, at_mlp=self.m.optimise == "pmet").at(layer)


class _KeyPass:
    """Keys and layer L's output for the layer loop, each pass starting as high as it can.

    Editing layer l changes block l's output but not its input: so once block l's input has been
    seen, later passes start there (blocks l..L) instead of at the embeddings, and no block above
    L ever runs. Rows end at the subject's last token (causal attention: nothing after matters).
    The rows run in groups of similar length (KEY_BUCKETS, editors.forward.length_buckets: the
    padding is not computed) of at most KEY_ROWS rows each, so memory does not grow with the batch.
    at_mlp: the "current output" is layer L's MLP output (PMET), not the block's.
    """

    def __init__(self, editor: Editor, requests, contexts: list[str], *, at_mlp: bool = False):
        from .forward import length_buckets

        self.ed, self.n, self.c, self.at_mlp = editor, len(requests), len(contexts), at_mlp
        rows, subj, bare = [], [], []
        for r in requests:
            for ci, ctx in enumerate(contexts):
                ids, s = encode_with_subject(editor.tokenizer, ctx, r.prompt, r.subject)
                if ci == 0:
                    bare.append(len(rows))
                rows.append(ids[: s + 1]); subj.append(s)
        self.dev = model_device(editor.model)
        self.bare = torch.tensor(bare, device=self.dev)  # (n,) row of each fact's bare prompt
        self.subj = torch.tensor(subj, device=self.dev)  # (n·c,)
        lengths = torch.tensor([len(r) for r in rows])  # (n·c,)
        groups = length_buckets(lengths, KEY_BUCKETS) if KEY_BUCKETS > 1 else [torch.arange(len(rows))]
        self.parts = []  # per group of rows: (row indices (g,), its batch, cached start)
        for g in groups:
            for i in range(0, len(g), KEY_ROWS):
                idx = g[i:i + KEY_ROWS]
                batch = pad_right([rows[j] for j in idx.tolist()], [subj[j] for j in idx.tolist()],
                                  pad_id(editor.tokenizer), device=self.dev)  # ids (g, T_g)
                self.parts.append([idx.to(self.dev), batch, None])  # start: (block, its input (g, T_g, d))

    def at(self, layer: int):
        keys, outs = None, None
        for part in self.parts:
            idx, batch = part[0], part[1]
            key, out_L, part[2] = self._run(batch, part[2], layer)
            at = torch.arange(len(batch.ids), device=key.device)  # (g,)
            k = key[at, batch.subject_pos].double()  # (g, d_in)
            o = out_L[at, batch.subject_pos].float()  # (g, d)
            if keys is None:
                keys = k.new_zeros(self.n * self.c, k.shape[-1])  # (n·c, d_in)
                outs = o.new_zeros(self.n * self.c, o.shape[-1])  # (n·c, d)
            keys[idx], outs[idx] = k, o
        K = keys.view(self.n, self.c, -1).mean(1).T  # (d_in, n)
        cur = outs[self.bare]  # (n, d) layer L's output at the bare prompt's subject
        return K, cur

    def _run(self, batch, start, layer: int):
        """One group's pass: key at `layer`, layer L's output, and the new cached start."""
        ed, spec, L = self.ed, self.ed.spec, self.ed.hp.v_layer
        out_name = spec.mlp_name(L) if self.at_mlp else spec.layer(L)
        if start is None:
            got = capture(ed.model, spec, batch.ids, block_inputs=[layer], mlp_out_inputs=[layer],
                          **({"mlp_outputs": [L]} if self.at_mlp else {"block_outputs": [L]}))
            key, block_in = got[f"key:{layer}"], got[f"in:{layer}"]
            out_L = got[f"mlp:{L}" if self.at_mlp else f"out:{L}"]  # (g, T, d)
        else:
            first, hidden = start
            names = [spec.mlp_out_name(layer), out_name] + ([spec.layer(layer)] if layer > first else [])
            with torch.no_grad(), TraceDict(ed.model, names, retain_input=True) as td:
                run_from(ed.model, spec, first, hidden, end=L + 1)
            key, out_L = td[spec.mlp_out_name(layer)].input, td[out_name].output
            block_in = td[spec.layer(layer)].input if layer > first else hidden
        return key, out_L, (layer, block_in)


KEY_BUCKETS = 3  # length groups of the key pass (each further group must save 5% of the padding)
KEY_ROWS = 512  # rows per key pass at most (6 context prompts per fact: ~85 facts)
