"""UltraEdit-class editor: lifelong-normalised gradients and a ridge solve, no v* optimisation.

UltraEdit (Gu et al., arXiv 2505.14679; ../shared/research/lifelong-2026.md §1.3), written for this
house's pieces. Per batch and per edited module (the MLP output projection of each layer in
`UltraEditHParams.layers`, W (d_out, d_in) in the math orientation of editors.model_spec):
1. ONE forward/backward pass, teacher-forced on prompt + target_new: at every position that
   predicts a target token t, the module's input k_t (d_in,) and g_t = ∂NLL/∂(module output)_t
   (d_out,), from a zero probe added to the output (the weights receive no .grad);
2. z_t = [k_t ‖ g_t] is merged into the never-reset running statistics (editors.lifelong_norm)
   and normalised with the merged ones: k̂, ĝ;
3. pseudo-values v_t = −η ‖k̂_t‖² ĝ_t (d_out,): the output change one gradient step on the
   normalised pair would give at its own key;
4. the ridge solve ΔW = argmin ‖ΔW K − V‖² + α‖ΔW‖², K (d_in, m) the RAW keys of this batch:
   ΔW = V Kᵀ(KKᵀ + αI)⁻¹ = V (KᵀK + αI)⁻¹ Kᵀ, the paper's (KᵀK + αI)⁻¹KᵀV in row form,
   returned factored: left = V (d_out, m), right = K (KᵀK + αI)⁻¹ (d_in, m), an m×m solve.
All layers use the same pass (the deltas are independent and summed), so a batch costs one
forward and one backward of the model, whatever the number of layers.

State: `UltraEditor.state` (LifelongStats) is read, never mutated, by compute(); the new state and
the batch's moments are in `editor.last_step` after each compute, and the caller advances with
`editor.advance(step)` once it has applied the result (the agent: in the operation's transaction).
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .forward import unembed
from .hooks import TraceDict
from .lifelong_norm import BatchMoments, LifelongStats
from .model_spec import spec_for
from .result import EditResult, LayerDelta
from .tokens import teacher_forced


@dataclass(frozen=True)
class UltraEditHParams:
    layers: tuple[int, ...]  # edited MLP output projections, ascending
    lr: float = 1e-4  # η: scale of the pseudo-values (UltraEdit's 1e-6 is for 4096-wide 8B models)
    ridge: float = 1.0  # α on KᵀK (absolute, in the raw keys' units, as in the paper)
    normalise: bool = True  # lifelong normalisation (False: raw k, g; the ablation that collapses)
    eps: float = 1e-6  # floor of the running standard deviation

    def __post_init__(self):
        layers = tuple(int(x) for x in self.layers)
        if not layers or list(layers) != sorted(set(layers)) or layers[0] < 0:
            raise ValueError(f"ultraedit layers must be non-empty, ascending, unique, ≥ 0: {layers}")
        object.__setattr__(self, "layers", layers)
        for name in ("lr", "ridge", "eps"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"ultraedit {name} must be a finite number > 0; got {v!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "UltraEditHParams":
        known = {f.name for f in dataclasses.fields(cls)}
        if set(d) - known:
            raise ValueError(f"unknown ultraedit hyperparameter(s): {', '.join(sorted(set(d) - known))}")
        return cls(**d)

    def replace(self, **changes) -> "UltraEditHParams":
        return UltraEditHParams.from_dict({**self.to_dict(), **changes})


# Per family (`<model_type>-<n_layers>L`). Only llama-30L (SmolLM2-135M) is measured:
# docs/lifelong.md "UltraEdit", counterfact-train offsets given there. The rest: not measured.
PRESETS: dict[str, dict] = {
    "llama-30L": dict(layers=(18, 19, 20, 21, 22, 23), lr=1e-4, ridge=1.0, _measured=True),
    "llama-32L": dict(layers=(26, 27, 28, 29, 30), lr=1e-6, ridge=1.0, _measured=False),
    "mistral-32L": dict(layers=(29, 30), lr=1e-6, ridge=1.0, _measured=False),  # the paper's modules
    "gptj-28L": dict(layers=(22, 23, 24, 25, 26), lr=1e-6, ridge=1.0, _measured=False),
    "gpt2-48L": dict(layers=(38, 39, 40, 41, 42), lr=1e-6, ridge=1.0, _measured=False),
}


def preset_for(model) -> tuple[UltraEditHParams, bool]:
    """(hparams, measured) for a model; an unknown family gets the last fifth of its layers
    but one, at the paper's η — not measured."""
    config = getattr(model, "config", model)
    n = int(getattr(config, "num_hidden_layers", None) or config.n_layer)
    k = max(1, n // 5)
    generic = tuple(range(max(0, n - 1 - k), n - 1)) or (n - 1,)
    p = dict(PRESETS.get(f"{config.model_type}-{n}L") or dict(layers=generic, lr=1e-6, _measured=False))
    measured = bool(p.pop("_measured"))
    return UltraEditHParams(**p), measured


def hparams_for(model, hp=None) -> tuple[UltraEditHParams, bool]:
    """(hparams, measured) for `model` under the workspace's EditHParams `hp` (editors.hparams):
    the family's preset, with each `ultraedit_*` knob `hp` sets (0 / [] keep the preset's value).
    `measured` is the preset's flag, False as soon as a knob differs from the measured preset."""
    preset, measured = preset_for(model)
    if hp is None:
        return preset, measured
    changes = dict(normalise=bool(hp.ultraedit_normalise), eps=float(hp.ultraedit_eps))
    if hp.ultraedit_layers:
        changes["layers"] = tuple(hp.ultraedit_layers)
    if hp.ultraedit_lr > 0:
        changes["lr"] = float(hp.ultraedit_lr)
    if hp.ultraedit_ridge > 0:
        changes["ridge"] = float(hp.ultraedit_ridge)
    out = preset.replace(**changes)
    return out, measured and out == preset


def as_edit_hparams(hp, uhp: UltraEditHParams):
    """`hp` (EditHParams) with the ultraedit_* knobs set to what `uhp` runs with: what the ledger
    records, so a replay on the same weights recomputes with exactly these values."""
    return hp.replace(ultraedit_layers=list(uhp.layers), ultraedit_lr=uhp.lr, ultraedit_ridge=uhp.ridge,
                      ultraedit_normalise=uhp.normalise, ultraedit_eps=uhp.eps)


def ridge_delta(K: torch.Tensor, V: torch.Tensor, alpha: float, *, W: torch.Tensor | None = None,
                out_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """ΔW = V (KᵀK + αI)⁻¹ Kᵀ as left = V (d_out, m), right = K (KᵀK + αI)⁻¹ (d_in, m). float64.

    K (d_in, m) keys, one per column; V (d_out, m) the wanted output changes ΔW k_j ≈ v_j.
    """
    if K.ndim != 2 or V.ndim != 2 or K.shape[1] != V.shape[1] or K.shape[1] == 0:
        raise ValueError(f"need K (d_in, m) and V (d_out, m), m ≥ 1; got {tuple(K.shape)}, {tuple(V.shape)}")
    if not alpha > 0:
        raise ValueError(f"α must be > 0; got {alpha}")
    K64, V64 = K.to(torch.float64), V.to(torch.float64)  # (d_in, m), (d_out, m)
    G = K64.T @ K64  # (m, m)
    G = 0.5 * (G + G.T)
    G.diagonal().add_(alpha)
    L, info = torch.linalg.cholesky_ex(G)  # (m, m); SPD since α > 0
    right = torch.cholesky_solve(K64.T, L).T if int(info) == 0 else torch.linalg.solve(G, K64.T).T  # (d_in, m)
    fit = V64 @ (right.T @ K64)  # (d_out, m)  ΔW K
    fro2 = float(((V64.T @ V64) * (right.T @ right)).sum())
    diag = {"n": float(K.shape[1]), "alpha": float(alpha), "value_norm": float(V64.norm()),
            "fit_ratio": float((fit - V64).norm() / V64.norm()) if float(V64.norm()) > 0 else 0.0,
            "delta_fro": math.sqrt(max(fro2, 0.0))}
    if W is not None:
        w = float(W.double().norm())
        diag["delta_rel_W"] = diag["delta_fro"] / w if w > 0 else math.inf
    return V64.to(out_dtype), right.to(out_dtype), diag


@dataclass(frozen=True)
class LifelongStep:
    """What one compute() did to the statistics: the batch's moments and the state after it."""

    batch: BatchMoments
    after: LifelongStats


class UltraEditor:
    """The Editor interface: compute(requests, *, memory=None, progress=None) -> EditResult."""

    method = "ultraedit"

    def __init__(self, model, tokenizer, hparams: UltraEditHParams, *, state: LifelongStats | None = None):
        self.model, self.tokenizer, self.hp = model, tokenizer, hparams
        self.spec = spec_for(model)
        n = self.spec.n_layers(model)
        if hparams.layers[-1] >= n:
            raise ValueError(f"ultraedit layers {hparams.layers} out of range for {n} layers")
        self.layers = hparams.layers
        self.state = state if state is not None else LifelongStats()
        self.last_step: LifelongStep | None = None
        self.measured: bool | None = None  # whether hparams are a measured preset (set by the caller)

    def advance(self, step: LifelongStep) -> None:
        """Adopt the statistics of an applied batch (the caller decides when it was applied)."""
        self.state = step.after

    def gradients(self, requests):
        """One teacher-forced forward/backward. Returns ({layer: K (m, d_in)}, {layer: G (m, d_out)},
        owner (m,) the request of each row, nll (n,) per request before the edit)."""
        tf = teacher_forced(self.tokenizer, [(r.text, r.target_new) for r in requests])
        names = {self.spec.mlp_out_name(l): l for l in self.layers}
        probes: dict[str, torch.Tensor] = {}

        def probe(output, name):  # output + 0, with the 0 a leaf whose gradient is ∂loss/∂output
            p = torch.zeros_like(output, requires_grad=True)
            probes[name] = p
            return output + p

        base = self.model.get_submodule(self.spec.base)
        with torch.enable_grad(), TraceDict(self.model, list(names), retain_input=True,
                                            retain_output=False, edit_output=probe) as td:
            ids = tf.batch.ids  # (B, T); right padding + causal attention: an all-ones mask is exact
            hidden = base(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).last_hidden_state
            logp = F.log_softmax(unembed(self.model, hidden[tf.rows, tf.cols]).float(), dim=-1)  # (m, V)
            nll = -logp.gather(1, tf.targets[:, None]).squeeze(1)  # (m,)
            grads = torch.autograd.grad(nll.sum(), [probes[nm] for nm in names])
        K = {l: td[nm].input[tf.rows, tf.cols].detach().double() for nm, l in names.items()}  # (m, d_in)
        G = {l: g[tf.rows, tf.cols].double() for g, l in zip(grads, names.values())}  # (m, d_out)
        return K, G, tf.owner, tf.per_item_mean(nll.detach())

    def compute(self, requests, *, memory=None, progress=None) -> EditResult:
        """Deltas for a batch; never changes the model or `self.state` (see `last_step`).
        memory: accepted for the Editor interface and ignored (UltraEdit keeps no key memory)."""
        if not requests:
            raise ValueError("no facts to edit")
        t0 = time.perf_counter()
        K, G, owner, nll = self.gradients(requests)
        t_grad = time.perf_counter() - t0
        batch = BatchMoments.of({l: torch.cat([K[l], G[l]], 1) for l in self.layers})  # (m, d_in + d_out)
        after = self.state.update(batch)
        n = len(requests)
        count = torch.bincount(owner, minlength=n).double()[:, None]  # (n, 1)
        result = EditResult(editor=self.method, deltas=[], timings={"gradients_s": t_grad},
                            value_stats=[{"nll": float(x)} for x in nll])
        for i, l in enumerate(self.layers):
            d_in = K[l].shape[1]
            if self.hp.normalise:
                z = after.normalise(l, torch.cat([K[l], G[l]], 1), self.hp.eps)  # (m, d_in + d_out)
                k_hat, g_hat = z[:, :d_in], z[:, d_in:]
            else:
                k_hat, g_hat = K[l], G[l]
            V = -self.hp.lr * k_hat.pow(2).sum(1, keepdim=True) * g_hat  # (m, d_out)
            W = self.spec.to_math(self.spec.edited_weight(self.model, l)).detach().double()  # (d_out, d_in)
            left, right, diag = ridge_delta(K[l].T, V.T, self.hp.ridge, W=W)
            result.deltas.append(LayerDelta(layer=l, param=self.spec.weight_name(l), left=left, right=right))
            # the ledger's one column per fact: the mean key of its rows, and W k̄ + ΔW k̄
            kbar = torch.zeros(n, d_in, dtype=torch.float64).index_add_(0, owner, K[l]) / count  # (n, d_in)
            result.keys[l] = kbar.T.float()  # (d_in, n)
            result.values[l] = (W @ kbar.T + left.double() @ (right.double().T @ kbar.T)).float()  # (d_out, n)
            result.diagnostics[f"layer{l}"] = diag
            if progress is not None:
                progress("ultraedit", i + 1, len(self.layers))
        result.diagnostics["lifelong_rows"] = float(after.count(self.layers[0]))
        if self.measured is not None:
            result.diagnostics["preset_measured"] = self.measured
        self.last_step = LifelongStep(batch=batch, after=after)
        result.timings["total_s"] = time.perf_counter() - t0
        return result
