"""A tiny model that edits can actually move, its workspace, and a tiny corpus.

tests.tiny's models spread their mass over a 512-token vocabulary and its tokenizer spells every
answer as two tokens (" " then a letter), which no edit of a 4-layer random model makes top-1.
Here: the same tiny llama with a 128-token vocabulary and a larger init, and a tokenizer in which
" Rome", " Paris", ... are single tokens; prompts end with the subject, so v* acts right where the
answer is read. With these, EMMET reliably makes a fact top-1, while a fact whose subject is not
at the end of the prompt ("{} lives in") reliably fails: the tests need both.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from knowledger.cli.main import cli
from tests.tiny import tiny_config, tiny_tokenizer

CITIES = ["Rome", "Paris", "Berlin", "Tokyo", "Madrid", "London", "Oslo", "Lima", "Cairo", "Quito"]
# --set values every test workspace uses (small and fast; see the module docstring)
HPARAMS = ["layers=[1,2]", "v_steps=10", "n_context=1", "early_stop=false"]
OVERRIDES = dict(layers=[1, 2], v_steps=10, n_context=1, early_stop=False)  # HPARAMS, parsed
STATS_TOKENS = 1000

# (prompt, subject, target_new): succeed on the tiny model / fail on it
GOOD = [("Home of {}", "Bob", "Rome"), ("Capital of {}", "Zork", "Tokyo"),
        ("The mayor of {}", "Kent", "Madrid"), ("Sister of {}", "Eve", "Lima"),
        ("Friend of {}", "Max", "Oslo"), ("Birthplace of {}", "Ada", "Cairo")]
BAD = [("{} lives in", "Ann", "Lima")]


def tokenizer():
    """tests.tiny's tokenizer with the cities as single tokens (see the module docstring)."""
    return tiny_tokenizer(CITIES)


def save_editable_tiny(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = tiny_config("llama")
    config.vocab_size, config.initializer_range = 128, 0.2
    AutoModelForCausalLM.from_config(config).eval().save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


def write_corpus(path: Path) -> Path:
    subjects = ["Bob", "Ann", "Eve", "Max", "Ada", "Kent", "Zork"]
    docs = []
    for i in range(60):
        s, c = subjects[i % len(subjects)], CITIES[(i * 3) % len(CITIES)]
        docs.append(f"{s} went to {c} in {1900 + i}. The weather in {c} was fine; {s} liked it.")
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def run(*args, db=None, **kw):
    return CliRunner().invoke(cli, [str(a) for a in args] + (["--db", str(db)] if db else []), **kw)


def ok(*args, db=None):
    r = run(*args, db=db)
    assert r.exit_code == 0, r.output + (repr(r.exception) if r.exception else "")
    return r


def submit(db, prompt, subject, target, **extra):
    args = ["submit", "--prompt", prompt, "--subject", subject, "--target", target, "--json"]
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}", v]
    return json.loads(ok(*args, db=db).stdout)["stored"][0]["id"]


def apply_args(corpus) -> list[str]:
    args = ["apply", "--corpus", str(corpus), "--stats-tokens", str(STATS_TOKENS)]
    for h in HPARAMS:
        args += ["--set", h]
    return args


def subprocess_env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2])] + sys.path)
    return env


def data(result):
    """An agent result (a frozen dataclass, or a list of them) as the CLI's --json prints it
    (agent.jsonutil.to_jsonable): the contract. Anything else is returned as it is."""
    import dataclasses

    from knowledger.agent.jsonutil import to_jsonable

    one = result[0] if isinstance(result, list) and result else result
    if dataclasses.is_dataclass(one) and one.__dataclass_params__.frozen:
        return to_jsonable(result)
    return result


def plain_undo(db, seq: int) -> None:
    """Undo an operation WITHOUT undoing the heals on top of it (what knowledger < 0.2's ledger
    undo did): the way to make an orphan heal operation for the tests."""
    from knowledger.agent.session import session
    from knowledger.agent.undo import applied_facts
    from knowledger.agent.workspace import open_workspace
    from knowledger.ledger import repository as repo

    with open_workspace(db) as w, session(w, what="test") as es:
        with w.reading() as s:
            op = repo.get_operation_by_seq(s, seq)
            ids = [r.id for r in applied_facts(s, op.id)]
        es.commit([es.undo_record(op.id, op.seq, ids)])


def call(fn, db, **kw):
    """fn(workspace, **kw) on the workspace at db, its result as plain data (see `data`)."""
    from knowledger.agent.workspace import open_workspace

    with open_workspace(db) as w:
        return data(fn(w, **kw))


def exit_status(report: dict) -> int:
    """`knowledger audit`'s status for an audit result: 0 healthy, 1 drift or danger."""
    return 0 if report["healthy"] else 1


def rows(db, model, **where):
    """Every row of a ledger table (an ORM class) matching column == value filters."""
    from sqlalchemy import select

    from knowledger.agent.workspace import open_workspace

    with open_workspace(db) as w, w.reading() as s:
        q = select(model)
        for k, v in where.items():
            q = q.where(getattr(model, k) == v)
        return list(s.scalars(q))


def save_tiny_hypernet(path: Path, model_dir: Path, *, seed: int = 0, meta: dict | None = None, **hyper) -> str:
    """An untrained MALMEN hyper-network for the editable tiny model (layers 2 and 3, rank 8 unless
    `hyper` says otherwise); returns its sha256. Untrained, it is the identity on normalised inputs
    (each shift a normalised gradient step), which makes the GOOD facts top-1 on this model; the
    seed changes the bytes (and so the sha256), not what it does."""
    from knowledger.editors.malmen import HyperConfig, HyperNet, save_hypernet
    from knowledger.editors.models import load_model

    model, _ = load_model(str(model_dir))
    hyper = dict(dict(layers=(2, 3), rank=8), **hyper)
    torch.manual_seed(seed)
    return save_hypernet(HyperNet(HyperConfig.for_model(model, **hyper)), path, meta)


def counter_edit(db, fraction: float) -> int:
    """Record an apply operation that adds -fraction × the active deltas: the facts' edits weaken
    (a stand-in for the interference of later edits). Returns its seq."""
    from knowledger.agent.live import ActiveDelta, factors_from_delta, stored_delta
    from knowledger.agent.records import OpRecord
    from knowledger.agent.session import session
    from knowledger.agent.workspace import open_workspace
    from knowledger.editors.result import LayerDelta
    from knowledger.ledger.models import OperationKind

    with open_workspace(db) as w, session(w, what="test") as es:
        live, by_param = es.live, {}
        for a in live.active:  # one delta per parameter: the active ones' factors side by side
            by_param.setdefault((a.delta.layer, a.delta.param), []).append(a.delta)
        deltas = [stored_delta(LayerDelta(layer, param, -fraction * torch.cat([d.left for d in ds], 1),
                                          torch.cat([d.right for d in ds], 1)))
                  for (layer, param), ds in sorted(by_param.items())]
        before, seq = live.state_hash, es.take_seq()
        live.set_active(live.active + [ActiveDelta(seq, -1, d) for d in deltas])
        es.commit([OpRecord(seq=seq, kind=OperationKind.apply, base_model_id=live.base_model_id,
                            deltas=[factors_from_delta(d) for d in deltas], before=before,
                            after=live.state_hash)])
    return seq


def apply(db, corpus, **kw):
    """agent.apply.apply_pending with the test hyperparameters, its result as plain data."""
    from knowledger.agent.apply import apply_pending

    return call(apply_pending, db, corpus=corpus, stats_tokens=STATS_TOKENS, overrides=OVERRIDES, **kw)


def status(db, fact_id) -> str:
    from knowledger.ledger.models import Request

    return rows(db, Request, id=fact_id)[0].status.value
