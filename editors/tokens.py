"""Token bookkeeping for edits: subject positions, target ids, right-padded batches.

Batches are right-padded and run without an attention mask: with causal attention, real tokens
never attend to the padding that follows them, and every position an editor reads (last subject
token, target positions) is a real token. Position ids are then simply 0..T-1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def target_ids(tokenizer, target: str) -> list[int]:
    """Token ids of a continuation, with a leading space as the next word would have."""
    text = target if target.startswith(" ") else " " + target
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"target {target!r} tokenises to nothing")
    return list(ids)


def encode_with_subject(tokenizer, prefix: str, template: str, subject: str) -> tuple[list[int], int]:
    """Tokenise `prefix + template.format(subject)`; return (ids, index of the last subject token)."""
    head, _, _ = template.partition("{}")
    text = prefix + template.format(subject)
    subj_end = len(prefix) + len(head) + len(subject)  # char offset just past the subject
    enc = tokenizer(text, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    last = None
    for i, (a, b) in enumerate(offsets):
        if a < subj_end and b > a:
            last = i  # the last token that starts before the subject ends
    if last is None:
        raise ValueError(f"subject {subject!r} not found in tokens of {text!r}")
    return list(ids), last


@dataclass
class Batch:
    """A right-padded batch. ids (B, T); rows' lengths; the subject position per row."""

    ids: torch.Tensor  # (B, T) long
    lengths: torch.Tensor  # (B,) long
    subject_pos: torch.Tensor  # (B,) long


def pad_right(rows: list[list[int]], subject_pos: list[int], pad_id: int) -> Batch:
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (B, T)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return Batch(ids=ids, lengths=torch.tensor([len(r) for r in rows]), subject_pos=torch.tensor(subject_pos))


def pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0
