"""Safe at the edges (issue 15): one row per probe, so that none of it slips back.

Each row is a probe a hostile but fair user ran, and what knowledger must do instead of what it
did: refuse in one line (naming the file, setting or operation), write nothing through a symlink,
never trust a damaged ledger or cache. Probes that already held have their own tests, listed in
HELD at the bottom (SIGKILL at every fault point: tests/agent/test_faults.py).
"""
from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest

from knowledger.agent.live import snapshot_path
from knowledger.agent.workspace import locate
from tests.agent.helpers import GOOD, HPARAMS, STATS_TOKENS, run, save_editable_tiny, submit, write_corpus


# --- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_editable_tiny(tmp_path_factory.mktemp("models") / "tiny-editable")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KNOWLEDGER_CACHE", str(tmp_path / "cache"))


def one_line_error(result) -> str:
    """The CLI refused: non-zero exit, and its complaint is exactly one `Error: ` line."""
    assert result.exit_code != 0, result.output
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert len(lines) >= 1 and lines[-1].startswith("Error: "), result.output
    assert "Traceback" not in result.output, result.output
    return lines[-1]


def _apply_args(corpus):
    sets = [a for h in HPARAMS for a in ("--set", h)]
    return ["apply", "--corpus", corpus, "--stats-tokens", STATS_TOKENS, "--batch-size", 1, *sets]


@pytest.fixture(scope="module")
def two_ops(tmp_path_factory, tiny_dir):
    """A workspace where seq 1 and seq 2 each applied one fact on layers 1 and 2; one fact pending.
    Copied per test (tests damage it)."""
    root = tmp_path_factory.mktemp("two-ops")
    os.environ["KNOWLEDGER_CACHE"] = str(root / "cache")
    try:
        ws, corpus = root / "ws", write_corpus(root / "corpus.txt")
        assert run("init", "--model", tiny_dir, db=ws).exit_code == 0
        for fact in GOOD[:2]:
            submit(ws, *fact)
        result = run(*_apply_args(corpus), db=ws)
        assert result.exit_code == 0, result.output
        submit(ws, *GOOD[2])
    finally:
        del os.environ["KNOWLEDGER_CACHE"]
    return ws, corpus


@pytest.fixture
def damaged_ws(two_ops, tmp_path):
    import shutil

    ws, corpus = two_ops
    copy = tmp_path / "ws"
    shutil.copytree(ws, copy)
    return copy, corpus


def _sql(ws: Path, *statements: str) -> None:
    con = sqlite3.connect(locate(ws).sqlite_file)
    with con:
        for st in statements:
            con.execute(st)
    con.close()


def _delete_one_delta_row(ws):
    _sql(ws, "DELETE FROM layer_deltas WHERE id = (SELECT MIN(d.id) FROM layer_deltas d "
             "JOIN operations o ON o.id = d.operation_id WHERE o.seq = 1)")


def _swap_two_param_names(ws):
    con = sqlite3.connect(locate(ws).sqlite_file)
    (a, pa), (b, pb) = con.execute("SELECT d.id, d.param FROM layer_deltas d JOIN operations o "
                                   "ON o.id = d.operation_id WHERE o.seq = 1 ORDER BY d.id").fetchall()[:2]
    con.close()
    assert pa != pb
    _sql(ws, f"UPDATE layer_deltas SET param = 'x' WHERE id = {a}",
         f"UPDATE layer_deltas SET param = '{pa}' WHERE id = {b}",
         f"UPDATE layer_deltas SET param = '{pb}' WHERE id = {a}")


DAMAGE = {"one layer_deltas row deleted": _delete_one_delta_row,
          "two rows' parameter names swapped (checksums still valid)": _swap_two_param_names}
COMMANDS = {
    "apply": lambda ws, corpus, tmp: _apply_args(corpus),
    "undo": lambda ws, corpus, tmp: ["undo", "--op", 2],
    "redo": lambda ws, corpus, tmp: ["redo", "--op", 1],
    "export": lambda ws, corpus, tmp: ["export", tmp / "out"],
    "ask": lambda ws, corpus, tmp: ["ask", "Home of Bob"],
    "audit": lambda ws, corpus, tmp: ["audit"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_ledger_is_refused_before_anything_is_computed_or_written(damaged_ws, tmp_path,
                                                                            damage, command):
    ws, corpus = damaged_ws
    snap = snapshot_path(locate(ws))
    before, n_ops = snap.read_bytes(), _count(ws, "operations")
    DAMAGE[damage](ws)
    err = one_line_error(run(*COMMANDS[command](ws, corpus, tmp_path), db=ws))
    assert "the ledger is damaged at operation seq 1 (apply)" in err, err
    assert snap.read_bytes() == before  # the good snapshot is never overwritten
    assert _count(ws, "operations") == n_ops  # no operation recorded on wrong weights
    assert not (tmp_path / "out").exists()


def _count(ws, table) -> int:
    con = sqlite3.connect(locate(ws).sqlite_file)
    try:
        return con.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    finally:
        con.close()


# --- probes, one row each ----------------------------------------------------------------------------
def _facts_ws(tmp_path):
    from tests.ledger.helpers import make_workspace

    return make_workspace(tmp_path / "ws")


def _stored(ws) -> int:
    from tests.ledger.helpers import count_facts

    return count_facts(ws)


def _submit_file_refused(tmp_path, name: str, data: bytes | None, *extra, expect: str):
    ws = _facts_ws(tmp_path)
    path = tmp_path / name
    if data is None:
        path.mkdir()
    else:
        path.write_bytes(data)
    from knowledger.ledger.facts import InvalidFacts, read_facts

    try:  # the reader: a row error or a file-level InvalidFacts, never another exception
        rows = read_facts(path)
        errors = [f"{path.name}:{r.line}: {r.error}" for r in rows if not r.ok]
    except InvalidFacts as e:
        errors = [str(e)]
    assert errors and expect in errors[0], errors
    if data is not None:  # (click refuses a directory for --file itself, in one line)
        err = one_line_error(run("submit", "--file", path, *extra, db=ws))
        assert f"{name}:" in err and expect in err, err
        assert _stored(ws) == 0


HEADER = b"prompt,subject,target_new,target_true\n"
FACT_FILES = {
    "a CSV row with fewer cells than its header": ("few.csv", HEADER + b"Home of {},Bob,Rome\n", (),
                                                   "few.csv:2: row has 3 cells, the header 4"),
    "an unterminated quote": ("quote.csv", HEADER + b'"Home of {},Bob,Rome\nCapital of {},Zork,Tokyo,Oslo\n', (),
                              "quote.csv:2: malformed CSV"),
    "an unterminated quote with --skip-invalid": (
        "quote2.csv", HEADER + b'Capital of {},Zork,Tokyo,Oslo\n"Home of {},Bob,Rome\n', ("--skip-invalid",),
        "quote2.csv:3: malformed CSV"),
    "JSON nested 100,000 deep": ("deep.json", b"[" * 100_000 + b"]" * 100_000, (), "deep.json:1: JSON nested too deeply"),
    "JSONL nested 100,000 deep": ("deep.jsonl", b"[" * 100_000 + b"]" * 100_000 + b"\n", (),
                                  "deep.jsonl:1: JSON nested too deeply"),
    "non-UTF-8 bytes": ("bad.csv", HEADER + b"Home of {},B\xffob,Rome,Oslo\n", (), "bad.csv:2: invalid UTF-8"),
    "a fact file that is a directory": ("dir.jsonl", None, (), "dir.jsonl: is a directory"),
    "a JSON row without its required keys": ("miss.jsonl", b'{"subject": "Bob"}\n', (), "miss.jsonl:1: prompt is missing"),
}


@pytest.mark.parametrize("probe", list(FACT_FILES))
def test_fact_file_problems_are_one_line_and_store_nothing(tmp_path, probe):
    name, data, extra, expect = FACT_FILES[probe]
    _submit_file_refused(tmp_path, name, data, *extra, expect=expect)


SETS = {"v_steps=abc": "hparams.v_steps must be an integer in [1, ",
        "v_steps=2.5": "hparams.v_steps must be an integer in [1, ",
        "v_lr=nan": "hparams.v_lr must be a finite number > 0",
        "v_lr=Infinity": "hparams.v_lr must be a finite number > 0",
        "v_lr=-1": "hparams.v_lr must be a finite number > 0",
        "emmet_ridge=-0.5": "hparams.emmet_ridge must be a finite number ≥ 0",
        "early_stop=maybe": "hparams.early_stop must be true or false",
        "layers=[2,1]": "hparams.layers must be ascending and unique",
        "n_context=1e9": "hparams.n_context must be an integer in [0, 1000]"}


@pytest.mark.parametrize("setting", list(SETS))
def test_set_values_are_parsed_by_type_and_range(setting, damaged_ws, tmp_path):
    """Refused in one line naming the field and its range: in the library (also for values read
    back from the ledger, which go through __post_init__) and through `apply --set`."""
    from knowledger.editors.hparams import EditHParams, HParamError

    key, _, text = setting.partition("=")
    value = json.loads(text) if text not in ("abc", "nan", "maybe") else text
    with pytest.raises(HParamError, match=SETS[setting].replace("[", r"\[").replace("(", r"\(")):
        EditHParams.from_dict({"layers": [1, 2], key: value})
    ws, corpus = damaged_ws  # (undamaged here)
    err = one_line_error(run(*_apply_args(corpus), "--set", setting, db=ws))
    assert SETS[setting] in err, err


# --- files: never through a symlink, modes, no temporaries -------------------------------------------
def test_hypernet_add_through_a_symlinked_artifacts_folder_is_refused(tmp_path, tiny_dir):
    from tests.agent.helpers import save_tiny_hypernet

    ws = _model_ws(tmp_path, tiny_dir)
    save_tiny_hypernet(tmp_path / "net", tiny_dir)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (ws / "artifacts").symlink_to(elsewhere)
    err = one_line_error(run("hypernet", "add", tmp_path / "net", db=ws))
    assert "symlink" in err and "artifacts" in err, err
    assert list(elsewhere.iterdir()) == []


def test_hypernet_copy_is_world_readable(tmp_path, tiny_dir):
    from tests.agent.helpers import save_tiny_hypernet

    ws = _model_ws(tmp_path, tiny_dir)
    sha = save_tiny_hypernet(tmp_path / "net", tiny_dir)
    assert run("hypernet", "add", tmp_path / "net", db=ws).exit_code == 0
    folder = ws / "artifacts" / sha
    assert folder.stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in folder.iterdir()} == {0o644}


def _model_ws(tmp_path, tiny_dir):
    ws = tmp_path / "ws"
    assert run("init", "--model", tiny_dir, db=ws).exit_code == 0
    return ws


def _nan_net(folder):
    from safetensors.torch import load_file, save_file

    t = load_file(folder / "hypernet.safetensors")
    name = sorted(t)[0]
    t[name] = t[name].clone().fill_(float("nan"))
    save_file(t, folder / "hypernet.safetensors")


def _inf_net(folder):
    from safetensors.torch import load_file, save_file

    t = load_file(folder / "hypernet.safetensors")
    name = sorted(k for k in t if t[k].is_floating_point())[-1]
    t[name] = t[name].clone()
    t[name].view(-1)[0] = float("inf")
    save_file(t, folder / "hypernet.safetensors")


def _oversized_config(folder):
    path = folder / "config.json"
    doc = json.loads(path.read_text())
    doc["hyper"]["rank"] = 10**7  # 10⁷ × (d_in + d_out) floats: allocating it first would hurt
    path.write_text(json.dumps(doc))


def _symlinked_config(folder):
    (folder / "real-config.json").write_bytes((folder / "config.json").read_bytes())
    (folder / "config.json").unlink()
    (folder / "config.json").symlink_to(folder / "real-config.json")


HYPERNETS = {"an all-NaN network": (_nan_net, "holds NaN or inf values"),
             "one inf weight": (_inf_net, "holds NaN or inf values"),
             "config.json sizes that do not match the weights": (_oversized_config, "config.json says"),
             "a symlinked config.json": (_symlinked_config, "is a symlink")}


@pytest.mark.parametrize("probe", list(HYPERNETS))
def test_hypernet_add_refuses(tmp_path, tiny_dir, probe):
    from tests.agent.helpers import save_tiny_hypernet

    ws = _model_ws(tmp_path, tiny_dir)
    save_tiny_hypernet(tmp_path / "net", tiny_dir)
    spoil, expect = HYPERNETS[probe]
    spoil(tmp_path / "net")
    err = one_line_error(run("hypernet", "add", tmp_path / "net", db=ws))
    assert expect in err, err
    assert not (ws / "artifacts").exists() or not any((ws / "artifacts").iterdir())


def test_export_modes_and_a_killed_exports_leftover(damaged_ws, tmp_path):
    ws, _ = damaged_ws  # (undamaged here)
    leftover = tmp_path / ".out.abcd1234"  # what atomic_dir leaves when the export is SIGKILLed
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    assert run("export", tmp_path / "out", db=ws).exit_code == 0
    assert not leftover.exists()
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert files and {p.stat().st_mode & 0o777 for p in files} == {0o644}
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


def test_a_symlinked_snapshot_is_never_written_through(damaged_ws, tmp_path):
    ws, _ = damaged_ws  # (undamaged here)
    snap = snapshot_path(locate(ws))
    outside = tmp_path / "important.txt"
    outside.write_text("keep me")
    snap.unlink()
    snap.symlink_to(outside)
    run("ask", "Home of Bob", db=ws)  # it may refuse; it must not write to the target
    assert outside.read_text() == "keep me"


def test_a_symlinked_report_folder_is_refused(damaged_ws, tmp_path):
    ws, _ = damaged_ws
    target = tmp_path / "target"
    target.mkdir()
    (ws / "report").symlink_to(target)
    assert run("report", db=ws).exit_code != 0
    assert list(target.iterdir()) == []


# --- caches -------------------------------------------------------------------------------------------
def _flip_a_bit(path):
    """One letter of a stored prefix changes case: still valid JSON, other text."""
    data = bytearray(path.read_bytes())
    i = data.index(b'. "') if b'. "' in data else data.index(b'."')
    while not chr(data[i]).isalpha():
        i -= 1
    data[i] ^= 0x20
    path.write_bytes(bytes(data))


CACHE_DAMAGE = {"a JSON list instead of the cache object": lambda p: p.write_text(json.dumps(["", "x"])),
                "a flipped bit": _flip_a_bit,
                "not JSON at all": lambda p: p.write_bytes(b"\x00\xff garbage"),
                "unreadable (a folder in its place)": lambda p: (p.unlink(), p.mkdir())}


@pytest.mark.parametrize("damage", list(CACHE_DAMAGE))
def test_a_damaged_contexts_cache_is_rebuilt_with_a_note(tmp_path, tiny_dir, damage, caplog):
    from knowledger.editors.contexts import cache_key, cache_path, context_prefixes
    from knowledger.editors.hparams import EditHParams
    from knowledger.editors.models import load_model

    model, tok = load_model(str(tiny_dir))
    hp = EditHParams(layers=(1, 2), n_context=2, context_tokens=4)
    fresh = context_prefixes(model, tok, hp, weights_sha="ab" * 32)
    path = cache_path(cache_key(tok, hp, "ab" * 32))
    assert path.is_file() and path.stat().st_mode & 0o777 == 0o644
    CACHE_DAMAGE[damage](path)
    with caplog.at_level("WARNING"):
        again = context_prefixes(model, tok, hp, weights_sha="ab" * 32)
    assert again == fresh
    assert any(str(path) in r.getMessage() for r in caplog.records), caplog.text


# --- models -------------------------------------------------------------------------------------------
def _truncated(folder):
    p = folder / "model.safetensors"
    p.write_bytes(p.read_bytes()[:1000])


def _garbage(folder):
    (folder / "model.safetensors").write_bytes(os.urandom(4096))


def _pickled_only(folder):
    import torch

    from safetensors.torch import load_file

    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


MODELS = {"a truncated safetensors file": (_truncated, "cannot load the model in"),
          "a garbage safetensors file": (_garbage, "cannot load the model in"),
          "a folder with a pickled .bin only": (_pickled_only, "has only pickled weights (pytorch_model.bin)")}


@pytest.mark.parametrize("probe", list(MODELS))
def test_init_on_a_broken_model_is_one_line(tmp_path, tiny_dir, probe):
    """editors.models raises one clear ModelLoadError; the CLI's error funnel prints it (cli/)."""
    import shutil

    from knowledger.editors.models import ModelLoadError, model_fingerprint

    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder)
    spoil, expect = MODELS[probe]
    spoil(folder)
    with pytest.raises(ModelLoadError) as e:
        model_fingerprint(str(folder))
    assert expect in str(e.value) and "\n" not in str(e.value)
    r = run("init", "--model", folder, db=tmp_path / "ws")
    assert r.exit_code != 0


# --- what held already, and where its test is ---------------------------------------------------------
HELD = {
    "SIGKILL at every fault point of apply, undo, rebase, redo, replay, audit --heal, submit, export":
        "tests/agent/test_faults.py",
    "non-finite updates refused before the weights": "tests/editors/test_apply.py, tests/editors/test_solvers.py",
    "a corrupt, stale or foreign snapshot is rebuilt": "tests/agent/test_live.py",
    "a corrupt delta blob is refused by its checksum": "tests/agent/test_replay_export.py",
    "concurrent submits and a second apply refused": "tests/agent/test_concurrency.py",
}


@pytest.mark.parametrize("probe", list(HELD))
def test_the_probes_that_held_keep_their_tests(probe):
    root = Path(__file__).parent.parent
    for path in HELD[probe].split(", "):
        assert (root / path).is_file(), path


def test_the_gguf_conversion_cache_is_shared_readable_and_never_written_through_a_symlink(tmp_path, monkeypatch):
    from knowledger.editors import models
    from knowledger.editors.fileio import UnsafePath

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF not really")

    def fake_convert(src, out):  # the real one takes ~20 s on the default model
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    folder = models._gguf_folder(gguf, "m")
    assert folder.stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in folder.iterdir()} == {0o644}
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary left
    other = tmp_path / "other-cache"
    elsewhere = tmp_path / "elsewhere"
    other.mkdir(), elsewhere.mkdir()
    (other / "models").symlink_to(elsewhere)
    monkeypatch.setenv("KNOWLEDGER_CACHE", str(other))
    with pytest.raises(UnsafePath):
        models._gguf_folder(gguf, "m")
    assert list(elsewhere.iterdir()) == []


def test_a_symlinked_lock_file_does_not_truncate_its_target(damaged_ws, tmp_path):
    from knowledger.agent.live import lock_path

    ws, _ = damaged_ws  # (undamaged here)
    lock = lock_path(locate(ws)).file  # agent.lock: O_NOFOLLOW, never O_TRUNC
    outside = tmp_path / "important.txt"
    outside.write_text("keep me")
    lock.unlink(missing_ok=True)
    lock.symlink_to(outside)
    run("ask", "Home of Bob", db=ws)
    assert outside.read_text() == "keep me"
