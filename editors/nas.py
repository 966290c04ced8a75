"""Norm-anchored value targets (NAS: "Norm Anchors Make Model Edits Last", arXiv 2602.02543).

Sequential locate-then-edit editing collapses through a feedback loop: larger edited weights give
larger hidden states, whose solved targets are larger, which give still larger updates. NAS cuts
the loop by rescaling every solved target to one reference norm measured on the clean model.

What is anchored (the paper's definition, ../shared/research/lifelong-2026.md §1.2): the norm of
the solved value vector v* = v₀ + δ itself, NOT of the change δ = v* − v₀. Here v₀ is the output of
the last edited layer L (the residual stream after block L) at the subject's last token of the bare
rewrite prompt, and v* = z is the target the editor solves for (editors.editor: z = cur + δ).

1. `pilot_norms(editor, requests)`: ‖v*‖ of pilot facts optimised on the CLEAN weights.
2. `measure_anchor(norms)`: ā = the mean of those norms after dropping the ones above the 95th
   percentile (the paper's rule; only the high tail is dropped, since collapse is norm growth).
3. `anchor_targets(z, ā, max_ratio=2)`: a target with ‖v*‖ > max_ratio·ā is refused (the paper
   skips it: v* = v₀, so the fact contributes no change); every other target is rescaled to
   v* · ā / ‖v*‖, keeping its direction.

The editor applies 3 when `hparams.nas` is on, with `hparams.nas_anchor` = ā (recorded with the
operation's hparams, so the edit is reproducible); refused facts are listed, with their reason,
in `EditResult.diagnostics["refused"]` ({request index: reason}) and the agent marks them failed.

The pilot facts are `PILOT_FACTS`: 20 fixed counterfactual rewrites (generic subjects, common
relations), the same for every model, so an anchor is reproducible and `PILOT_SHA256` names the set
it came from. The agent (agent.anchors) runs them once per base model and stores the anchor in
the ledger beside it.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import torch

from .requests import EditRequest

DROP_ABOVE_PERCENTILE = 95.0

# (prompt, subject, target_new): counterfactual rewrites in CounterFact's style, none of them true
PILOT_FACTS: tuple[tuple[str, str, str], ...] = (
    ("The capital of {} is", "France", "Berlin"), ("{} is located in the continent of", "Brazil", "Asia"),
    ("The official language of {} is", "Japan", "Spanish"), ("{} was born in the city of", "Albert Einstein", "Madrid"),
    ("{} plays the sport of", "Lionel Messi", "baseball"), ("The headquarters of {} are in", "Google", "Paris"),
    ("{} is a product made by", "iPhone", "Nokia"), ("{} speaks the language", "Vladimir Putin", "French"),
    ("The mother tongue of {} is", "Angela Merkel", "Italian"), ("{} is a citizen of", "Barack Obama", "Canada"),
    ("{} works in the field of", "Isaac Newton", "music"), ("The religion of {} is", "the Dalai Lama", "Islam"),
    ("{} was founded in the city of", "Toyota", "London"), ("{} is affiliated with the", "Manchester United", "NBA"),
    ("The original broadcaster of {} was", "The Simpsons", "BBC"), ("{} plays the instrument", "Jimi Hendrix", "piano"),
    ("{} is the capital city of", "Tokyo", "Mexico"), ("The genre of {} is", "Metallica", "jazz"),
    ("{} is a member of the", "Germany", "African Union"), ("The author of {} is", "Hamlet", "Tolstoy"),
)
PILOT_SHA256 = hashlib.sha256(json.dumps(PILOT_FACTS).encode()).hexdigest()


def pilot_requests() -> list[EditRequest]:
    """PILOT_FACTS as edit requests (what `pilot_norms` is given to measure an anchor)."""
    return [EditRequest(p, s, t) for p, s, t in PILOT_FACTS]


class AnchorError(ValueError):
    """Pilot norms from which no anchor can be measured (empty, non-finite, non-positive)."""


@dataclass(frozen=True)
class Anchor:
    """The reference norm ā and how it was measured (what the ledger stores beside the base model)."""

    norm: float  # ā: robust mean of ‖v*‖ over the pilot facts
    n_pilot: int  # pilot facts measured
    n_used: int  # kept after dropping the high tail
    cutoff: float  # norms above this were dropped
    rule: str = f"mean of ‖v*‖ at or below the {DROP_ABOVE_PERCENTILE:g}th percentile"

    def to_dict(self) -> dict:
        return dict(norm=self.norm, n_pilot=self.n_pilot, n_used=self.n_used, cutoff=self.cutoff,
                    rule=self.rule)


def measure_anchor(norms, *, percentile: float = DROP_ABOVE_PERCENTILE) -> Anchor:
    """ā from pilot ‖v*‖ values: the mean of those at or below the `percentile`-th percentile.

    norms: a sequence or tensor (n,) of positive finite norms (from `pilot_norms`).
    The percentile is linear interpolation between order statistics (torch.quantile); with fewer
    than ~20 pilots it usually drops only the largest one or none.
    """
    x = torch.as_tensor(norms, dtype=torch.float64).flatten()  # (n,)
    if x.numel() == 0:
        raise AnchorError("no pilot norms: run pilot edits on the clean weights first")
    if not bool(torch.isfinite(x).all()) or bool((x <= 0).any()):
        raise AnchorError("pilot norms must be finite and > 0")
    if not 0 < percentile <= 100:
        raise AnchorError(f"percentile must be in (0, 100]; got {percentile}")
    cutoff = float(torch.quantile(x, percentile / 100.0))
    kept = x[x <= cutoff]  # (m,) never empty: the minimum is ≤ any quantile
    return Anchor(norm=float(kept.mean()), n_pilot=int(x.numel()), n_used=int(kept.numel()), cutoff=cutoff,
                  rule=f"mean of ‖v*‖ at or below the {percentile:g}th percentile")


@dataclass
class Anchored:
    values: torch.Tensor  # (n, d): rescaled targets; refused rows are `fallback` (or unchanged)
    refused: dict[int, str]  # row index -> reason
    scale: torch.Tensor  # (n,): ā / ‖v*‖ applied per row (1.0 for refused rows)
    norms: torch.Tensor  # (n,): ‖v*‖ before anchoring


def anchor_targets(values: torch.Tensor, anchor: float, max_ratio: float = 2.0, *,
                   fallback: torch.Tensor | None = None) -> Anchored:
    """Rescale each target row to norm `anchor`, refusing those above max_ratio · anchor.

    values   # (n, d) solved targets v* (float32 or float64; the result has the same dtype)
    fallback # (n, d) optional: what a refused row becomes (the editor passes v₀, the current
             # output, so a refused fact asks for no change); without it refused rows are unchanged
    """
    if not (isinstance(anchor, (int, float)) and math.isfinite(anchor) and anchor > 0):
        raise ValueError(f"the NAS anchor must be a finite norm > 0; got {anchor!r}")
    if not max_ratio > 0:
        raise ValueError(f"max_ratio must be > 0; got {max_ratio}")
    if values.ndim != 2:
        raise ValueError(f"values must be (n, d); got {tuple(values.shape)}")
    if fallback is not None and fallback.shape != values.shape:
        raise ValueError(f"fallback {tuple(fallback.shape)} does not match values {tuple(values.shape)}")
    v64 = values.detach().to(torch.float64)  # (n, d)
    norms = v64.norm(dim=1)  # (n,)
    too_big = norms > max_ratio * anchor  # (n,)
    degenerate = ~torch.isfinite(norms) | (norms == 0)
    refuse = too_big | degenerate
    scale = torch.where(refuse, torch.ones_like(norms), anchor / norms.clamp(min=1e-300))  # (n,)
    out = v64 * scale[:, None]  # (n, d)
    if fallback is not None and bool(refuse.any()):
        out[refuse] = fallback.detach().to(torch.float64)[refuse]
    refused = {}
    for i in refuse.nonzero().flatten().tolist():
        if bool(degenerate[i]):
            refused[i] = "NAS: the solved target value is zero or not finite"
        else:
            refused[i] = (f"NAS: the solved target's norm {float(norms[i]):.4g} is above "
                          f"{max_ratio:g}× the anchor {anchor:.4g} ({float(norms[i]) / anchor:.2f}×)")
    return Anchored(values=out.to(values.dtype), refused=refused, scale=scale, norms=norms)


def pilot_norms(editor, requests, *, progress=None) -> torch.Tensor:
    """‖v*‖ (n,) for pilot facts on the editor's model as it is now (call it on the CLEAN weights).

    v* = v₀ + δ, as the editor's compute() forms it: δ from the editor's own value optimisation
    (editors.values, with the method's value hparams), v₀ the editor's "current output" of layer
    L = hparams.v_layer at the subject's last token of each bare prompt (the block's output; L's
    MLP output for PMET). Nothing is applied.
    """
    from .values import optimise_values

    requests = list(requests)
    if not requests:
        raise AnchorError("no pilot facts")
    hp, pmet = editor.hp, editor.m.optimise == "pmet"
    with torch.enable_grad():
        targets = optimise_values(editor.model, editor.tokenizer, editor.spec, requests,
                                  editor.m.value_hparams(hp), editor.contexts, pmet=pmet, progress=progress)
    with torch.no_grad():
        _, v0 = editor._keys_and_current(requests, hp.v_layer, editor.contexts)  # (n, d)
    return (v0.double() + targets.delta.double()).norm(dim=1)  # (n,)
