"""A trained MALMEN hyper-network as a file artefact: a folder with hypernet.safetensors +
config.json, named by the sha256 of both (what a workspace registers it by)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .config import HyperConfig
from .net import HyperNet

WEIGHTS, CONFIG = "hypernet.safetensors", "config.json"


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
    doc = json.loads((folder / CONFIG).read_text())
    net = HyperNet(HyperConfig.from_dict(doc["hyper"]))
    net.load_state_dict(load_file(str(folder / WEIGHTS)))
    train_tokens = doc.get("meta", {}).get("train_tokens")
    net.train_tokens = float(train_tokens) if train_tokens else None
    return net.eval(), artefact_sha256(folder)


def read_meta(folder: str | os.PathLike) -> dict:
    return json.loads((Path(folder) / CONFIG).read_text()).get("meta", {})
