"""MALMEN hyper-networks in a workspace: register, choose, list, and load one verified.

Lifecycle: `knowledger train-malmen --out DIR` trains one (agent.malmen_train) → `knowledger
hypernet add DIR` checks that it loads and fits the workspace's base model, keeps a copy, records
it in the ledger's `artifacts` table and (unless --no-use) makes it the workspace's current one
(the setting `malmen_hypernet` = its sha256) → `knowledger apply --editor malmen` (or `auto` for a
batch of `malmen_min_batch` facts) edits with the current one. Every MALMEN operation records its
`artifact_id`; whatever recomputes that operation's facts later (undo's re-apply of the rest of a
batch, rebase, redo of one fact, replay --recompute) uses the hyper-network that operation ran on,
never the current one: the ledger says exactly which network made each edit.

Identity: the sha256 over config.json then hypernet.safetensors (editors.malmen.artefact_sha256),
checked against the files every time they are loaded, so a changed or replaced file is refused
rather than silently editing with another network. Registering the same sha256 twice changes
nothing (content-addressed, append-only).

Where the files are kept: a workspace with a directory (a path or a sqlite:/// URL) owns a copy in
`<home>/artifacts/<sha256>/`, recorded relative to its home so the workspace can move; for a bare
SQLAlchemy URL the ledger may be shared by machines with different homes, so the absolute path of
the registered folder is recorded and must stay readable there.

Torch is imported only to load a network; listing needs none.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from knowledger.agent.workspace import Location, Workspace, iso
from knowledger.editors.fileio import UnsafePath, atomic_dir, check_inside
from knowledger.ledger import repository as repo
from knowledger.ledger.errors import IntegrityError, KnowledgerError, NotFound
from knowledger.ledger.models import Artifact, BaseModel

KIND = "malmen-hypernet"
SETTING = "malmen_hypernet"  # agent.scheduler.EditSettings.malmen_hypernet
ARTIFACTS_DIR = "artifacts"
FILES = ("config.json", "hypernet.safetensors")  # editors.malmen.CONFIG, WEIGHTS
NONE_REGISTERED = ("no MALMEN hyper-network registered: train one with `knowledger train-malmen` "
                   "and add it with `knowledger hypernet add DIR`")


@dataclass(frozen=True)
class HypernetRef:
    """A registered hyper-network: what a MALMEN batch is computed with (EditSession.edit_batch's
    `hp` for MALMEN, as EditHParams is for the other editors)."""

    artifact_id: int
    sha256: str
    path: str  # as recorded: relative to the workspace home, or absolute
    lambda_scale: str = "trained"  # EditHParams.malmen_lambda: how e^λ meets this batch's size

    @classmethod
    def of(cls, row: Artifact, lambda_scale: str = "trained") -> HypernetRef:
        return cls(row.id, row.sha256, row.path, lambda_scale)


def folder_of(loc: Location, path: str) -> Path:
    """Where a recorded path is: relative paths are under the workspace home."""
    return loc.home / path  # an absolute `path` replaces the home


# --- reading the current and the recorded one ---------------------------------------------------
def current(session) -> Artifact | None:
    """The workspace's current hyper-network, if one is set."""
    sha = repo.get_setting(session, SETTING)
    return repo.artifact_by_sha(session, sha) if sha else None


def current_ref(session, sha: str | None = None, lambda_scale: str = "trained") -> HypernetRef:
    """The current hyper-network (`sha`: the setting as the caller read it, default: read it now),
    or the one-line error that says how to get one; lambda_scale: the workspace's malmen_lambda."""
    sha = sha or repo.get_setting(session, SETTING)
    if not sha:
        raise KnowledgerError(NONE_REGISTERED)
    row = repo.artifact_by_sha(session, sha)
    if row is None:
        raise KnowledgerError(f"the current MALMEN hyper-network {sha[:12]} is not in the ledger: "
                              f"add it again with `knowledger hypernet add DIR`")
    return HypernetRef.of(row, lambda_scale)


def recorded_ref(session, op) -> HypernetRef:
    """The hyper-network a MALMEN operation ran on: its artifact_id, else (an operation whose
    artifact_id a schema downgrade dropped) the sha256 its hparams recorded; with the malmen_lambda
    it ran with ("trained" for operations recorded before the knob)."""
    lam = (op.hparams_json or {}).get("malmen_lambda", "trained")
    if op.artifact_id is not None:
        return HypernetRef.of(repo.get_artifact(session, op.artifact_id), lam)
    sha = (op.hparams_json or {}).get("hypernet_sha256")
    row = repo.artifact_by_sha(session, sha) if sha else None
    if row is None:
        raise KnowledgerError(f"operation seq {op.seq} ran MALMEN with hyper-network {(sha or '?')[:12]}, "
                              f"which this workspace has not registered: add it again with "
                              f"`knowledger hypernet add DIR`")
    return HypernetRef.of(row, lam)


def load_verified(loc: Location, ref: HypernetRef):
    """(HyperNet, sha256) of a registered hyper-network, refused unless its files still hash to
    the registered sha256."""
    from knowledger.editors.malmen import load_hypernet

    folder = folder_of(loc, ref.path)
    try:
        net, sha = load_hypernet(folder)
    except FileNotFoundError as e:
        raise KnowledgerError(f"MALMEN hyper-network {ref.sha256[:12]} is missing from {folder}: "
                              f"add it again with `knowledger hypernet add DIR`") from e
    except Exception as e:  # noqa: BLE001 (a truncated or foreign file: torch, safetensors, JSON errors)
        raise IntegrityError(f"MALMEN hyper-network {ref.sha256[:12]} in {folder} cannot be loaded "
                             f"({_one_line(e)}): add it again with `knowledger hypernet add DIR`") from e
    if sha != ref.sha256:
        raise IntegrityError(f"MALMEN hyper-network {ref.sha256[:12]} in {folder}: its files hash to "
                             f"{sha[:12]}…, not the registered sha256 (changed or replaced since it "
                             f"was added); refusing to edit with it")
    return net, sha


# --- registering ---------------------------------------------------------------------------------
def read_folder(folder: str | os.PathLike) -> tuple[object, str, dict]:
    """(HyperConfig, sha256, config.json) of a hyper-network folder, after loading its weights
    (a folder whose files do not load is refused here, not at the first apply). Refused in one
    line: files that are symlinks, config.json sizes that the weights' shapes do not match (checked
    from the safetensors header before anything is allocated), non-finite (NaN, inf) weights."""
    from knowledger.editors.malmen import HyperConfig, load_hypernet

    folder = Path(folder)
    if not folder.is_dir():
        raise KnowledgerError(f"{folder} is not a folder: give the --out folder of `knowledger train-malmen`")
    for name in FILES:
        if (folder / name).is_symlink():
            raise KnowledgerError(f"{folder / name} is a symlink: refusing to register it (copy the file "
                                  f"itself into the folder)")
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise KnowledgerError(f"{folder} is not a MALMEN hyper-network (no {' and '.join(reversed(FILES))}); "
                              f"make one with `knowledger train-malmen`")
    try:
        config = json.loads((folder / FILES[0]).read_text(encoding="utf-8"))
        _check_shapes(folder, HyperConfig.from_dict(config["hyper"]))
        net, sha = load_hypernet(folder)
    except FileNotFoundError as e:
        raise KnowledgerError(_one_line(e)) from e
    except KnowledgerError:
        raise
    except Exception as e:  # noqa: BLE001 (bad JSON, unknown settings, mismatched tensors, ...)
        raise KnowledgerError(f"{folder} is not a usable MALMEN hyper-network: {_one_line(e)}") from e
    import torch

    bad = [k for k, v in net.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise KnowledgerError(f"{folder}: the hyper-network's {bad[0]} holds NaN or inf values (a diverged "
                              f"training run?): refusing it; train again or use an earlier checkpoint")
    return net.config, sha, config


def _check_shapes(folder: Path, cfg) -> None:
    """config.json's sizes against the weights file's header, before the weights are loaded."""
    import torch
    from safetensors import safe_open

    from knowledger.editors.malmen import HyperNet

    with torch.device("meta"):  # shapes only: no memory, whatever config.json claims
        want = {k: tuple(v.shape) for k, v in HyperNet(cfg).state_dict().items()}
    with safe_open(str(folder / FILES[1]), framework="pt") as f:
        got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    for k in sorted(want.keys() | got.keys()):
        if want.get(k) != got.get(k):
            raise KnowledgerError(f"{folder}: config.json says {k} has shape {want.get(k)}, "
                                  f"{FILES[1]} holds {got.get(k)}: the files do not belong together")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] + ("…" if len(text) > 300 else "")


def _meta_model(config: dict):
    """The base model's architecture on the meta device (no weights, no memory), from its recorded
    config; None when this transformers cannot rebuild it (then only the cheap checks run)."""
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    except Exception:  # noqa: BLE001 (any failure only means: check less)
        return None


def _n_layers(config: dict) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def check_against_base(cfg, meta: dict, base: BaseModel) -> list[str]:
    """Refuse a hyper-network trained for another model shape than the workspace's base model;
    notes for what fits but may edit poorly (trained on other weights of the same shape)."""
    from knowledger.editors.malmen import check_compatible

    where = f"the workspace's base model {base.name_or_path}"
    if cfg.model_type != base.architecture:
        raise KnowledgerError(f"the hyper-network was trained for a {cfg.model_type}; {where} is a "
                              f"{base.architecture}")
    model = _meta_model(base.config_json or {})
    if model is not None:
        try:
            check_compatible(cfg, model)
        except ValueError as e:
            raise KnowledgerError(f"{e} ({where})") from e
    elif _n_layers(base.config_json or {}) not in (None, cfg.n_model_layers):
        raise KnowledgerError(f"the hyper-network was trained for a {cfg.model_type} with "
                              f"{cfg.n_model_layers} layers; {where} has {_n_layers(base.config_json)}")
    trained_on = meta.get("model_weights_sha256")
    if trained_on and trained_on != base.weights_sha256:
        return [f"the hyper-network was trained on other weights ({trained_on[:12]}…) than {where} "
                f"({base.weights_sha256[:12]}…): same shape, but it may edit this model poorly"]
    return []


def _keep(loc: Location, folder: Path, sha: str) -> tuple[str, bool]:
    """(the path to record, whether files were copied): a copy under <home>/artifacts/<sha256>
    (written to a temporary folder, checked, renamed into place), or for a bare URL the source."""
    if loc.sqlite_file is None:
        return str(folder.resolve()), False
    from knowledger.editors.malmen import artefact_sha256

    rel = f"{ARTIFACTS_DIR}/{sha}"
    dest = loc.home / rel
    check_inside(dest, loc.home)  # a symlinked <home>/artifacts is refused, never written through
    if dest.is_dir() and _hashes_to(dest, sha):
        return rel, False
    # a damaged earlier copy is swapped out only once the checked new one is complete
    with atomic_dir(dest, replace=True) as tmp:  # folder 0755, files 0644
        for name in FILES:
            shutil.copyfile(folder / name, tmp / name, follow_symlinks=False)
        if artefact_sha256(tmp) != sha:
            raise IntegrityError(f"{folder} changed while it was copied: add it again")
    return rel, True


def _hashes_to(folder: Path, sha: str) -> bool:
    from knowledger.editors.malmen import artefact_sha256

    try:
        return artefact_sha256(folder) == sha
    except OSError:
        return False


def add(ws: Workspace, folder: str | os.PathLike, *, use: bool = True) -> dict:
    """Register a trained hyper-network with the workspace (see the module docstring)."""
    folder = Path(folder).expanduser()
    cfg, sha, config = read_folder(folder)
    with ws.reading() as s:
        base = repo.current_base_model(s)
        if base is None:
            raise KnowledgerError("the workspace has no base model: run `knowledger init`")
        notes = check_against_base(cfg, config.get("meta") or {}, base)
    try:
        path, copied = _keep(ws.location, folder, sha)  # files first: a copy no row names is harmless
    except UnsafePath as e:
        raise KnowledgerError(f"{e}: refusing to copy the hyper-network there") from e
    with ws.writing() as s:
        row, created = repo.register_artifact(s, kind=KIND, sha256=sha, path=path,
                                              meta=dict(hyper=config.get("hyper"), meta=config.get("meta")))
        if use:
            repo.set_setting(s, SETTING, sha)
        view = artifact_view(ws.location, row, current_sha=repo.get_setting(s, SETTING))
    return dict(view, created=created, copied=copied, notes=notes)


def use(ws: Workspace, sha_prefix: str) -> dict:
    """Make a registered hyper-network (named by a prefix of its sha256) the current one."""
    prefix = sha_prefix.strip().lower()
    if len(prefix) < 4:
        raise ValueError("give at least 4 characters of the hyper-network's sha256")
    with ws.writing() as s:
        rows = [r for r in repo.list_artifacts(s, kind=KIND) if r.sha256.startswith(prefix)]
        if not rows:
            raise NotFound(f"no registered MALMEN hyper-network {prefix} (knowledger hypernet list)")
        if len(rows) > 1:
            raise ValueError(f"{prefix} names {len(rows)} hyper-networks: give more of the sha256")
        old = repo.get_setting(s, SETTING)
        repo.set_setting(s, SETTING, rows[0].sha256)
        view = artifact_view(ws.location, rows[0], current_sha=rows[0].sha256)
    return dict(view, previous=old)


# --- listing -------------------------------------------------------------------------------------
def training_summary(meta: dict | None) -> dict | None:
    """What train-malmen recorded about the network: its step, held-out scores, model, facts."""
    m = (meta or {}).get("meta") or {}
    if not m:
        return None
    v = m.get("validation") or {}
    return dict(step=m.get("step"), model=m.get("model"), train_facts=m.get("train_facts"),
                val_facts=m.get("val_facts"),
                validation={k: v[k] for k in ("efficacy", "paraphrase", "neighborhood", "score") if k in v} or None)


def artifact_view(loc: Location, row: Artifact, *, current_sha: str | None) -> dict:
    hyper = (row.meta_json or {}).get("hyper") or {}
    folder = folder_of(loc, row.path)
    return dict(id=row.id, sha256=row.sha256, kind=row.kind, path=str(folder), recorded_path=row.path,
                present=folder.is_dir(), created_at=iso(row.created_at), current=row.sha256 == current_sha,
                layers=hyper.get("layers"), model_type=hyper.get("model_type"),
                training=training_summary(row.meta_json))


def list_hypernets(ws: Workspace) -> list[dict]:
    """The registered hyper-networks, oldest first, with which one is current."""
    with ws.reading() as s:
        sha = repo.get_setting(s, SETTING)
        return [artifact_view(ws.location, r, current_sha=sha) for r in repo.list_artifacts(s, kind=KIND)]
