"""MALMEN as an editor (editors.base.ModelEditor): facts -> keys and gradients (gradients.py) ->
the hyper-network's value shifts (net.py) -> one least-squares update per layer (solve.py), as an
EditResult of factored deltas; the model is left untouched (Tan, Zhang & Fu, ICLR 2024, Alg. 1)."""
from __future__ import annotations

import math
import time
from typing import Sequence

import torch

from ..model_spec import spec_for
from ..progress import Progress, report
from ..requests import EditRequest
from ..result import EditResult, LayerDelta
from ..tokens import TeacherForced
from .config import check_compatible
from .gradients import cache_tokens, rewrite_chunks
from .net import HyperNet
from .solve import Normal, factor


class MalmenEditor:
    """An editors.base.ModelEditor: compute(requests) -> EditResult, the model untouched."""

    method = "malmen"
    reads_memory = False  # MALMEN keeps no past-edit memory

    def __init__(self, model, tokenizer, net: HyperNet, *, sha: str | None = None,
                 lambda_scale: str = "trained"):
        """lambda_scale: "trained" solves with e^λ_ℓ as learned; "tokens" with e^λ_ℓ · n / n_train
        (n: this batch's edit tokens, n_train: the mean per training step, net.train_tokens)."""
        if lambda_scale not in ("trained", "tokens"):
            raise ValueError(f"unknown lambda_scale {lambda_scale!r} (accepted: trained, tokens)")
        if lambda_scale == "tokens" and not net.train_tokens:
            raise ValueError("malmen_lambda=tokens needs the training batch's size, which this "
                             "hyper-network does not record (trained before it was kept): retrain, "
                             "or use malmen_lambda=trained")
        self.model, self.tokenizer, self.net, self.sha = model, tokenizer, net.eval(), sha
        self.lambda_scale = lambda_scale
        self.spec = spec_for(model)
        check_compatible(net.config, model)
        self.layers = net.config.layers

    def compute(self, requests: Sequence[EditRequest], *, memory=None,
                progress: Progress | None = None) -> EditResult:
        """Deltas for a batch of facts (memory: ignored). progress("hypernet", facts done, facts)."""
        requests = list(requests)
        if not requests:
            raise ValueError("no facts to edit")
        done = 0
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
            done += len(chunk)
            report(progress, "hypernet", done, len(requests))
            t = time.perf_counter()  # the next chunk's tokenising counts as caching
        result = EditResult(editor=self.method, deltas=[], timings=timings,
                            diagnostics={"hypernet_sha256": self.sha, "edit_loss_before": loss})
        for i, l in enumerate(cfg.layers):
            lam = self.log_lambda(i, normals[l].n)
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

    def log_lambda(self, i: int, n: int) -> float:
        """The λ that solves layer index i's normal equation of n rows: the trained λ_ℓ, plus
        log(n / n_train) under lambda_scale "tokens" (UᵀU and UᵀD are sums over rows, so this keeps
        the ridge's share of the normal matrix at what training saw)."""
        lam = float(self.net.log_lambda[i].detach())
        if self.lambda_scale == "tokens" and n > 0:
            lam += math.log(n / self.net.train_tokens)
        return lam


def _to(tf: TeacherForced, device) -> TeacherForced:
    if str(device) == "cpu":
        return tf
    from dataclasses import replace
    b = replace(tf.batch, ids=tf.batch.ids.to(device))
    return replace(tf, batch=b, rows=tf.rows.to(device), cols=tf.cols.to(device),
                   targets=tf.targets.to(device), owner=tf.owner.to(device))
