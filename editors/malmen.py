"""MALMEN (Tan, Zhang & Fu, ICLR 2024): a meta-learned hyper-network turns each edit's gradient
into a value shift, and a ridge least squares aggregates the shifts into one update per layer.

For each edited linear layer ℓ (an MLP output projection, W_ℓ (d_out, d_in)) and each edit token j
(a position that predicts a token of target_new):
    u_j  (d_in,)   the layer's input, from one forward pass over prompt + target
    g_j  (d_out,)  ∂L_edit/∂v_j, the edit loss's gradient at the layer's output, one backward pass
The hyper-network maps [u_j; g_j] to (ũ_j, g̃_j) and the value shift is
    d_j = −lr_ℓ · (u_j · ũ_j) · g̃_j
and the update solves min_S Σ_j ‖Sᵀu_j − d_j‖² + e^{λ_ℓ}‖S‖²  (the normal equation):
    S_ℓ = (UᵀU + e^{λ_ℓ} I)⁻¹ UᵀD,   ΔW_ℓ = S_ℓᵀ          U (n, d_in), D (n, d_out)
UᵀU and UᵀD are sums over tokens, so the LM passes and the hyper-network both run in chunks: any
number of facts fits in memory. All layers' tokens come from one pass over the unedited model.

The hyper-network (HyperNet): per layer and feature running normalisation of [u; g], then
residual low-rank blocks x + B relu(A x), each followed by a per-layer scale and shift; the
blocks are shared by the layers (they have one shape), the normalisation, scale, shift, lr_ℓ
and λ_ℓ are per layer. lr and e^λ are learned in log space. B starts at zero, so an untrained
network is the identity on normalised inputs: d_j is then a normalised gradient step.

Meta-training lives in knowledger.agent.malmen_train; this module only edits. A trained network
is a folder (`save_hypernet`): hypernet.safetensors + config.json, named by the sha256 of both.

    net, sha = load_hypernet("runs/malmen")
    editor = MalmenEditor(model, tokenizer, net, sha=sha)
    result = editor.compute(requests)        # EditResult; the model is left untouched
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .forward import unembed
from .hooks import TraceDict
from .model_spec import ModelSpec, spec_for
from .requests import EditRequest
from .result import EditResult, LayerDelta
from .tokens import TeacherForced, teacher_forced

WEIGHTS, CONFIG = "hypernet.safetensors", "config.json"


@dataclass(frozen=True)
class HyperConfig:
    """What a hyper-network is for (model shape, edited layers) and its own size."""

    layers: tuple[int, ...]  # edited MLP output projections, ascending
    d_in: int  # key width of those layers (the MLP's hidden width)
    d_out: int  # value width (the model width)
    model_type: str  # config.model_type of the model it was trained on
    n_model_layers: int
    rank: int = 128  # width of each residual block's bottleneck
    n_blocks: int = 2
    lm_batch: int = 32  # facts per LM pass (chunking: memory, not results)
    net_batch: int = 4096  # tokens per hyper-network pass

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        if not self.layers or list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"HyperConfig.layers must be ascending and unique: {self.layers}")
        for name in ("d_in", "d_out", "rank", "n_blocks", "lm_batch", "net_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"HyperConfig.{name} must be ≥ 1")

    @classmethod
    def for_model(cls, model, layers: tuple[int, ...] | None = None, **kw) -> "HyperConfig":
        """The default: the last fifth of the blocks (MALMEN and MEND edit the top MLPs)."""
        spec = spec_for(model)
        n = spec.n_layers(model)
        layers = tuple(layers) if layers else tuple(range(n - max(1, n // 5), n))
        if max(layers) >= n:
            raise ValueError(f"layers {layers} out of range for {n} layers")
        d_out, d_in = spec.mlp_dims(model, layers[0])
        return cls(layers=layers, d_in=d_in, d_out=d_out, model_type=model.config.model_type,
                   n_model_layers=n, **kw)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "HyperConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown hyper-network setting(s): {', '.join(sorted(unknown))}")
        return cls(**d)


class RunningNorm(nn.Module):
    """Per-layer, per-feature standardisation with statistics merged batch by batch (Chan et al.).

    Until two samples have been seen it is the identity. Statistics are buffers: saved with the
    network, updated only by `update` (meta-training), never by a forward pass."""

    def __init__(self, n_layers: int, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.register_buffer("count", torch.zeros(n_layers, dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(n_layers, dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(n_layers, dim, dtype=torch.float64))

    @torch.no_grad()
    def update(self, i: int, x: torch.Tensor) -> None:
        """Merge x  # (n, dim) into layer i's statistics."""
        x = x.detach().double()
        n_b = x.shape[0]
        if n_b == 0:
            return
        mean_b = x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
        n_a = self.count[i].clone()
        n = n_a + n_b
        delta = mean_b - self.mean[i]
        self.mean[i] += delta * n_b / n
        self.m2[i] += m2_b + delta ** 2 * n_a * n_b / n
        self.count[i] = n

    def forward(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if self.count[i] < 2:
            return x
        std = (self.m2[i] / (self.count[i] - 1)).sqrt().clamp_min(self.eps)
        return (x - self.mean[i].to(x.dtype)) / std.to(x.dtype)


class LowRankBlock(nn.Module):
    """x + B relu(A x), then a per-layer scale and shift  # (n, dim) -> (n, dim)"""

    def __init__(self, dim: int, rank: int, n_layers: int):
        super().__init__()
        self.down = nn.Linear(dim, rank)
        self.up = nn.Linear(rank, dim)
        nn.init.zeros_(self.up.weight)  # identity at initialisation
        nn.init.zeros_(self.up.bias)
        self.scale = nn.Parameter(torch.ones(n_layers, dim))
        self.shift = nn.Parameter(torch.zeros(n_layers, dim))

    def forward(self, x: torch.Tensor, i: int) -> torch.Tensor:
        h = x + self.up(F.relu(self.down(x)))
        return h * self.scale[i] + self.shift[i]


class HyperNet(nn.Module):
    """[u; g] -> value shift d, per edited layer (index i into config.layers)."""

    def __init__(self, config: HyperConfig):
        super().__init__()
        self.config = config
        L, dim = len(config.layers), config.d_in + config.d_out
        self.norm = RunningNorm(L, dim)
        self.blocks = nn.ModuleList(LowRankBlock(dim, config.rank, L) for _ in range(config.n_blocks))
        self.log_lr = nn.Parameter(torch.zeros(L))  # lr_ℓ = exp(log_lr); set from data at step 0
        self.log_lambda = nn.Parameter(torch.zeros(L))  # λ_ℓ of the normal equation

    def forward(self, i: int, u: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """u (n, d_in), g (n, d_out) -> d (n, d_out)"""
        x = self.norm(i, torch.cat([u, g], -1))  # (n, d_in + d_out)
        for block in self.blocks:
            x = block(x, i)
        u_t, g_t = x.split([self.config.d_in, self.config.d_out], -1)
        return -self.log_lr[i].exp() * (u * u_t).sum(-1, keepdim=True) * g_t

    def shifts(self, i: int, u: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """forward in chunks of config.net_batch tokens  # (n, d_in), (n, d_out) -> (n, d_out)"""
        step = self.config.net_batch
        return torch.cat([self(i, u[s : s + step], g[s : s + step]) for s in range(0, len(u), step)]
                         or [u.new_zeros(0, self.config.d_out)])


# --- the LM side: edit tokens and their gradients ----------------------------------------------------
def edit_loss(model, tf: TeacherForced, hidden: torch.Tensor) -> torch.Tensor:
    """Σ over items of the mean NLL of their target tokens (one item's gradient does not depend on
    the others in its batch)  # hidden (B, T, d) -> ()"""
    logp = F.log_softmax(unembed(model, hidden[tf.rows, tf.cols]).float(), -1)  # (m, V)
    nll = -logp.gather(1, tf.targets[:, None]).squeeze(1)  # (m,)
    return tf.per_item_mean(nll).sum()


@dataclass
class TokenCache:
    """Per edited layer, the edit tokens' keys u (n, d_in) and output gradients g (n, d_out);
    `first` (n_facts,) indexes each fact's first target token (its last prompt token)."""

    u: dict[int, torch.Tensor] = field(default_factory=dict)
    g: dict[int, torch.Tensor] = field(default_factory=dict)
    first: torch.Tensor | None = None
    loss: float = 0.0  # Σ over facts of the mean target NLL before editing
    v_norm: dict[int, float] = field(default_factory=dict)  # median ‖v‖ at the edit tokens

    @property
    def n_tokens(self) -> int:
        return len(next(iter(self.u.values()))) if self.u else 0


def final_hidden(model, spec: ModelSpec, tf: TeacherForced) -> torch.Tensor:
    """The final-normed hidden states of a teacher-forced batch  # -> (B, T, d)"""
    ids = tf.batch.ids
    base = model.get_submodule(spec.base)
    return base(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).last_hidden_state


def cache_tokens(model, spec: ModelSpec, layers, tf: TeacherForced, *,
                 run: Callable | None = None) -> TokenCache:
    """One forward and one backward pass of the edit loss: u and ∂L/∂v at every edit token.

    ∂L/∂v is read as the gradient of a zero tensor added to each layer's output, so nothing of the
    model needs requires_grad and the gradient includes every path above the layer.
    run(tf) -> final hidden states (B, T, d): how to run the LM (default `final_hidden`; meta-
    training passes one that starts from cached inputs of the first edited block)."""
    names = [spec.mlp_out_name(l) for l in layers]
    zeros: dict[str, torch.Tensor] = {}

    def add_zero(out, name):
        zeros[name] = torch.zeros_like(out, requires_grad=True)
        return out + zeros[name]

    run = run or (lambda t: final_hidden(model, spec, t))
    with torch.enable_grad(), TraceDict(model, names, retain_input=True, retain_output=True,
                                        edit_output=add_zero) as td:
        hidden = run(tf)
        loss = edit_loss(model, tf, hidden)
        grads = torch.autograd.grad(loss, [zeros[n] for n in names])
    cache = TokenCache(first=tf.first(), loss=float(loss.detach()))
    for l, name, grad in zip(layers, names, grads):
        cache.u[l] = td[name].input[tf.rows, tf.cols].float()  # (n, d_in)
        cache.g[l] = grad[tf.rows, tf.cols].float()  # (n, d_out)
        cache.v_norm[l] = float(td[name].output[tf.rows, tf.cols].norm(dim=-1).median())
    return cache


def rewrite_chunks(tokenizer, requests: list[EditRequest], lm_batch: int):
    """(facts, their rewrite prompt + target_new as a TeacherForced batch), lm_batch facts at a time."""
    for s in range(0, len(requests), lm_batch):
        chunk = requests[s : s + lm_batch]
        yield chunk, teacher_forced(tokenizer, [(r.text, r.target_new) for r in chunk])


def cache_requests(model, tokenizer, spec: ModelSpec, layers, requests: list[EditRequest],
                   lm_batch: int, progress: Callable | None = None, run: Callable | None = None) -> TokenCache:
    """cache_tokens over the rewrite prompts, lm_batch facts per pass, concatenated."""
    parts = []
    for chunk, tf in rewrite_chunks(tokenizer, requests, lm_batch):
        parts.append(cache_tokens(model, spec, layers, tf, run=run))
        if progress:
            progress(len(chunk))
    out = TokenCache(loss=sum(p.loss for p in parts),
                     v_norm={l: sorted(p.v_norm[l] for p in parts)[len(parts) // 2] for l in layers})
    offset, firsts = 0, []
    for p in parts:
        firsts.append(p.first + offset)
        offset += p.n_tokens
    out.first = torch.cat(firsts)
    for l in layers:
        out.u[l] = torch.cat([p.u[l] for p in parts])
        out.g[l] = torch.cat([p.g[l] for p in parts])
    return out


# --- the aggregation ---------------------------------------------------------------------------------
@dataclass
class Normal:
    """Running sums of the normal equation for one layer: UᵀU (d_in, d_in), UᵀD (d_in, d_out), ‖D‖²."""

    utu: torch.Tensor
    utd: torch.Tensor
    dd: float = 0.0
    n: int = 0

    @classmethod
    def empty(cls, d_in: int, d_out: int) -> "Normal":
        return cls(torch.zeros(d_in, d_in, dtype=torch.float64), torch.zeros(d_in, d_out, dtype=torch.float64))

    def add(self, u: torch.Tensor, d: torch.Tensor) -> None:
        u, d = u.detach().double(), d.detach().double()
        self.utu += u.T @ u
        self.utd += u.T @ d
        self.dd += float((d * d).sum())
        self.n += len(u)

    def matrix(self, log_lambda: float) -> torch.Tensor:
        """UᵀU + e^λ I  # (d_in, d_in)"""
        return self.utu + torch.eye(len(self.utu), dtype=torch.float64) * math.exp(float(log_lambda))

    def factor(self, log_lambda: float) -> torch.Tensor:
        """The Cholesky factor of UᵀU + e^λ I (SPD for any λ), for torch.cholesky_solve  # (d_in, d_in)"""
        return torch.linalg.cholesky(self.matrix(log_lambda))

    def solve(self, log_lambda: float) -> torch.Tensor:
        """S = (UᵀU + e^λ I)⁻¹ UᵀD  # (d_in, d_out), float64"""
        return torch.cholesky_solve(self.utd, self.factor(log_lambda))

    def residual(self, S: torch.Tensor) -> float:
        """‖US − D‖ / ‖D‖ without U: ‖US‖² − 2⟨US, D⟩ + ‖D‖² = tr(SᵀUᵀUS) − 2 tr(SᵀUᵀD) + ‖D‖²"""
        if self.dd <= 0:
            return 0.0
        sq = float((S * (self.utu @ S)).sum() - 2 * (S * self.utd).sum()) + self.dd
        return max(sq, 0.0) ** 0.5 / self.dd ** 0.5


def aggregate(u: torch.Tensor, d: torch.Tensor, log_lambda: float) -> torch.Tensor:
    """The normal equation for one layer in one go  # u (n, d_in), d (n, d_out) -> S (d_in, d_out)"""
    acc = Normal.empty(u.shape[1], d.shape[1])
    acc.add(u, d)
    return acc.solve(log_lambda)


def factor(S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ΔW = Sᵀ as LayerDelta factors (left (d_out, r), right (d_in, r)) of rank r ≤ min(d_in, d_out):
    a thin QR of S (d_in, d_out) = Q R gives ΔW = Rᵀ Qᵀ, i.e. left = Rᵀ, right = Q."""
    if S.shape[0] >= S.shape[1]:
        Q, R = torch.linalg.qr(S)  # (d_in, d_out), (d_out, d_out)
        return R.T.contiguous(), Q
    return S.T.contiguous(), torch.eye(S.shape[0], dtype=S.dtype)


# --- the editor ------------------------------------------------------------------------------------------
class MalmenEditor:
    """Same interface as editors.editor.Editor: compute(requests) -> EditResult, model untouched."""

    method = "malmen"

    def __init__(self, model, tokenizer, net: HyperNet, *, sha: str | None = None):
        self.model, self.tokenizer, self.net, self.sha = model, tokenizer, net.eval(), sha
        self.spec = spec_for(model)
        check_compatible(net.config, model)
        self.layers = net.config.layers

    def compute(self, requests: list[EditRequest], progress: Callable | None = None, *,
                memory=None) -> EditResult:
        """Deltas for a batch of facts (memory: ignored, MALMEN keeps no past-edit memory)."""
        if not requests:
            raise ValueError("no facts to edit")
        cfg, net, spec = self.net.config, self.net, self.spec
        t0 = time.perf_counter()
        timings = {"cache_s": 0.0, "hypernet_s": 0.0, "solve_s": 0.0}
        normals = {l: Normal.empty(cfg.d_in, cfg.d_out) for l in cfg.layers}
        keys: dict[int, list[torch.Tensor]] = {l: [] for l in cfg.layers}
        device = next(self.model.parameters()).device
        loss = 0.0
        t = time.perf_counter()
        for chunk, tf in rewrite_chunks(self.tokenizer, requests, cfg.lm_batch):  # LM chunk, then
            cache = cache_tokens(self.model, spec, cfg.layers, _to(tf, device))  # its network chunks
            loss += cache.loss
            timings["cache_s"] += time.perf_counter() - t
            t = time.perf_counter()
            with torch.no_grad():
                for i, l in enumerate(cfg.layers):
                    u = cache.u[l].cpu()
                    d = net.shifts(i, u, cache.g[l].cpu())  # (n, d_out)
                    normals[l].add(u, d)
                    keys[l].append(u[cache.first.cpu()])  # (facts, d_in): the last prompt token's key
            timings["hypernet_s"] += time.perf_counter() - t
            if progress:
                progress(len(chunk))
            t = time.perf_counter()  # the next chunk's tokenising counts as caching
        result = EditResult(editor=self.method, deltas=[], timings=timings,
                            diagnostics={"hypernet_sha256": self.sha, "edit_loss_before": loss})
        for i, l in enumerate(cfg.layers):
            lam = float(net.log_lambda[i].detach())
            S = normals[l].solve(lam)  # (d_in, d_out)
            left, right = factor(S)
            delta = LayerDelta(layer=l, param=spec.weight_name(l), left=left.float(), right=right.float())
            result.deltas.append(delta)
            K = torch.cat(keys[l]).T.double()  # (d_in, facts)
            W = spec.to_math(spec.edited_weight(self.model, l)).detach().double().cpu()  # (d_out, d_in)
            result.keys[l] = K.float()
            result.values[l] = ((W + S.T) @ K).float()  # (d_out, facts)
            result.diagnostics[f"layer{l}"] = dict(
                tokens=normals[l].n, log_lambda=lam, lr=float(net.log_lr[i].detach().exp()),
                fit_residual=normals[l].residual(S), delta_norm=float(S.norm()),
                weight_norm=float(W.norm()))
        timings["solve_s"] = time.perf_counter() - t
        timings["total_s"] = time.perf_counter() - t0
        return result


def _to(tf: TeacherForced, device) -> TeacherForced:
    if str(device) == "cpu":
        return tf
    from dataclasses import replace
    b = replace(tf.batch, ids=tf.batch.ids.to(device))
    return replace(tf, batch=b, rows=tf.rows.to(device), cols=tf.cols.to(device),
                   targets=tf.targets.to(device), owner=tf.owner.to(device))


def check_compatible(cfg: HyperConfig, model) -> None:
    """A clear error when a hyper-network was trained for another model shape."""
    spec = spec_for(model)
    n = spec.n_layers(model)
    d_out, d_in = spec.mlp_dims(model, cfg.layers[0] if cfg.layers[0] < n else 0)
    got = (model.config.model_type, n, d_in, d_out)
    want = (cfg.model_type, cfg.n_model_layers, cfg.d_in, cfg.d_out)
    if got != want:
        raise ValueError(f"the hyper-network was trained for a {want[0]} with {want[1]} layers and MLP "
                         f"{want[2]}→{want[3]}; this model is a {got[0]} with {got[1]} layers and MLP "
                         f"{got[2]}→{got[3]}")


# --- the artefact ------------------------------------------------------------------------------------------
def artefact_sha256(folder: str | os.PathLike) -> str:
    """sha256 over the weights file and the config, the name a workspace registers it by."""
    h = hashlib.sha256()
    for name in (CONFIG, WEIGHTS):
        h.update((Path(folder) / name).read_bytes())
    return h.hexdigest()


def save_hypernet(net: HyperNet, folder: str | os.PathLike, meta: dict | None = None) -> str:
    """Write hypernet.safetensors + config.json into `folder` (created or replaced file by file,
    each written to a temp name and renamed); returns the artefact's sha256."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    config = json.dumps({"hyper": net.config.to_dict(), "meta": meta or {}}, indent=1, sort_keys=True)
    tmp = Path(tempfile.mkdtemp(prefix=".hypernet.", dir=folder))
    try:
        save_file(tensors, str(tmp / WEIGHTS))
        (tmp / CONFIG).write_text(config + "\n", encoding="utf-8")
        for name in (WEIGHTS, CONFIG):
            (tmp / name).chmod(0o644)  # readable like any model file (mkdtemp's folder is private)
            os.replace(tmp / name, folder / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return artefact_sha256(folder)


def load_hypernet(folder: str | os.PathLike) -> tuple[HyperNet, str]:
    """A saved hyper-network (eval mode) and its sha256."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / WEIGHTS).is_file() or not (folder / CONFIG).is_file():
        raise FileNotFoundError(f"{folder} is not a MALMEN hyper-network (no {WEIGHTS} and {CONFIG}); "
                                "make one with `knowledger train-malmen`")
    cfg = HyperConfig.from_dict(json.loads((folder / CONFIG).read_text())["hyper"])
    net = HyperNet(cfg)
    net.load_state_dict(load_file(str(folder / WEIGHTS)))
    return net.eval(), artefact_sha256(folder)


def read_meta(folder: str | os.PathLike) -> dict:
    return json.loads((Path(folder) / CONFIG).read_text()).get("meta", {})
