"""Tensor bytes in the ledger: numpy arrays ⇄ safetensors bytes, with sha256 checks.

The ledger never imports torch; the agent converts torch tensors to numpy arrays (bfloat16 as
float32) before they get here. One blob holds one array under the key "t".
"""
from __future__ import annotations

import hashlib

import numpy as np
from safetensors.numpy import load as _load, save as _save

from knowledger.ledger.errors import IntegrityError

_KEY = "t"


def encode(array: np.ndarray) -> bytes:
    """safetensors bytes of one array (made contiguous)."""
    return _save({_KEY: np.ascontiguousarray(array)})


def decode(data: bytes) -> np.ndarray:
    try:
        return _load(bytes(data))[_KEY]
    except Exception as e:  # safetensors raises its own error types on corrupt headers
        raise IntegrityError(f"stored tensor bytes are not a valid safetensors blob: {e}") from e


def sha256(*blobs: bytes) -> str:
    """sha256 over the blobs in order."""
    h = hashlib.sha256()
    for b in blobs:
        h.update(b)
    return h.hexdigest()


def decode_checked(blobs: tuple[bytes, ...], expected_sha256: str, what: str) -> list[np.ndarray]:
    """Decode blobs after checking their joint sha256; raises IntegrityError on a mismatch."""
    actual = sha256(*blobs)
    if actual != expected_sha256:
        raise IntegrityError(f"{what}: checksum mismatch (stored {expected_sha256[:12]}…, "
                             f"bytes hash to {actual[:12]}…)")
    return [decode(b) for b in blobs]


def frobenius_norm(left: np.ndarray, right: np.ndarray) -> float:
    """‖L Rᵀ‖_F without forming the dense matrix: sqrt(sum((LᵀL) ⊙ (RᵀR))), in float64."""
    l, r = left.astype(np.float64), right.astype(np.float64)  # (d_out, r), (d_in, r)
    return float(np.sqrt(max(float(((l.T @ l) * (r.T @ r)).sum()), 0.0)))
