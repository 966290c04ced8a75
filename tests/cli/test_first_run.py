"""The README's first run on a tiny model (issue 13): no --corpus, so the model samples its own
statistics text; run as a real subprocess whose stdout and stderr are pipes, never terminals, so
every phase must report in plain lines (no bar frames)."""
from __future__ import annotations

import subprocess
import sys

from tests.agent.helpers import HPARAMS, subprocess_env

CLI = [sys.executable, "-c", "from knowledger.cli.main import cli; cli()"]


def cli(db, cache, *args):
    proc = subprocess.run(CLI + [str(a) for a in args] + ["--db", str(db)], capture_output=True,
                          text=True, env=subprocess_env(KNOWLEDGER_CACHE=str(cache)), timeout=300)
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    return proc


def test_first_run_without_corpus_samples_and_reports_in_plain_lines(ws, tmp_path):
    cache = tmp_path / "cache"  # empty: nothing sampled, no statistics
    cli(ws, cache, "submit", "--prompt", "Home of {}", "--subject", "Bob", "--target", "Rome")
    sets = [x for h in HPARAMS for x in ("--set", h)]
    r = cli(ws, cache, "apply", "--stats-tokens", "300", *sets)
    err = r.stderr.splitlines()
    assert "sampling 300 tokens of statistics text from the model ..." in err, r.stderr
    sample = [ln for ln in err if ln.startswith("apply: sample ")]
    assert sample[0] == "apply: sample 0/316" and sample[-1] == "apply: sample 316/316", r.stderr
    assert any(ln.startswith("sampling 300 tokens ... done in ") for ln in err), r.stderr
    assert any("keys per layer collected while sampling" in ln for ln in err), r.stderr
    assert not any(ln.startswith("apply: stats ") for ln in err)  # no second pass over the text
    assert "apply: apply 1/1" in err, r.stderr
    assert "\r" not in r.stderr and "%|" not in r.stderr  # lines, not bar frames
    assert r.stdout.startswith("seq 1 apply committed"), r.stdout
    assert len(list((cache / "corpora").glob("*-300-0.txt"))) == 1
    assert len(list((cache / "stats").glob("*.safetensors"))) == 2  # layers 1 and 2, as sampled
    # a second apply reads both from the cache: no sampling, no statistics pass
    cli(ws, cache, "submit", "--prompt", "Capital of {}", "--subject", "Zork", "--target", "Tokyo")
    r = cli(ws, cache, "apply", *sets)
    assert "sampl" not in r.stderr and "statistics" not in r.stderr, r.stderr
    assert r.stdout.startswith("seq 2 apply committed"), r.stdout
