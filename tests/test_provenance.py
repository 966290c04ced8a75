"""The thread rule set at knowledger.agent's import, and the provenance block of benchmark JSON."""
import json
import os
import subprocess
import sys


def _policy_after_import(env_extra: dict) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | env_extra
    code = "import os, knowledger.agent; print(os.environ.get('OMP_WAIT_POLICY'))"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_passive_wait_unless_the_user_chose():
    assert _policy_after_import({}) == "PASSIVE"
    assert _policy_after_import({"OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"


def test_provenance_is_json_with_what_tells_runs_apart():
    from knowledger.agent.provenance import provenance

    p = json.loads(json.dumps(provenance()))
    for key in ("torch", "transformers", "torch_threads", "cpu", "cpu_count", "load_avg", "omp_wait_policy"):
        assert key in p
    assert p["torch_threads"] >= 1 and len(p["load_avg"]) == 3


def test_phase_lines_reach_stderr_once(capsys):
    import logging

    from knowledger.cli.progress import show_phase_lines

    show_phase_lines()
    show_phase_lines()  # idempotent: one line per record, not two
    logging.getLogger("knowledger.editors.stats").info("statistics: 10 tokens ... done in 1.0 s")
    assert capsys.readouterr().err.count("statistics: 10 tokens ... done in 1.0 s") == 1
