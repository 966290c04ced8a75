"""Time the README's main command as a new user runs it: every `knowledger` step of its first
command line, in a fresh workspace, with an empty KNOWLEDGER_CACHE (unless --cache names one),
output to pipes (not a terminal), as subprocesses.

    python bench/first_run.py [--out bench/results/first-run/run.json] [--cache DIR] [--keep]

The command line is read from README.md (the `# 1.` line of the first bash block; the `pip
install` steps are skipped: install is timed separately). Per step: wall seconds, CPU seconds
(user + system of the child), and every stderr/stdout line with the second it appeared at, so the
phases inside `apply` can be read off. At the end: whether the edit held (the `ask` answer starts
with " Rome"; then, untimed, `ask` of each --check prompt: the Louvre must stay " Paris"), and provenance (load,
threads, versions). Prints a table; writes the JSON with --out.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_steps(readme: Path) -> list[list[str]]:
    """The `knowledger ...` steps of the README's first command line (after `# 1.`)."""
    lines = readme.read_text(encoding="utf-8").splitlines()
    i = next(n for n, line in enumerate(lines) if line.startswith("# 1."))
    return [shlex.split(part) for part in lines[i + 1].split(" && ")
            if part.strip().startswith("knowledger ")]


def run_step(argv: list[str], cwd: Path, env: dict, t0: float) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, bufsize=1)
    lines: list[dict] = []

    def pump(stream, name):
        for line in stream:
            lines.append(dict(t=round(time.perf_counter() - start, 2), stream=name,
                              line=line.rstrip("\n")))

    threads = [threading.Thread(target=pump, args=(proc.stdout, "out")),
               threading.Thread(target=pump, args=(proc.stderr, "err"))]
    for t in threads:
        t.start()
    rc = proc.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return dict(argv=argv[1:3] if len(argv) > 2 else argv[1:], rc=rc, wall_s=round(wall, 1),
                cpu_s=round(cpu, 1), started_s=round(start - t0, 1), lines=sorted(lines, key=lambda d: d["t"]),
                max_rss_mb=round(after.ru_maxrss / 1024))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--cache", type=Path, help="KNOWLEDGER_CACHE to use (default: a new empty one)")
    ap.add_argument("--knowledger", default=str(Path(sys.executable).parent / "knowledger"),
                    help="the knowledger executable (default: the one beside this python)")
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    ap.add_argument("--check", nargs="*", default=["The Louvre is located in the city of"],
                    help="prompts asked after the timed command (not timed): the neighbours")
    ap.add_argument("--note", default="", help="free text stored in the JSON (machine state etc.)")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    steps = readme_steps(a.readme)
    with tempfile.TemporaryDirectory(prefix="kn-first-run-") as tmp:
        cache = a.cache or Path(tmp) / "cache"
        work = Path(tmp) / "work"
        work.mkdir()
        env = dict(os.environ, KNOWLEDGER_CACHE=str(cache))
        load_before = [round(x, 2) for x in os.getloadavg()]
        t0 = time.perf_counter()
        rows = []
        for argv in steps:
            row = run_step([a.knowledger, *argv[1:]], work, env, t0)
            rows.append(row)
            print(f"{' '.join(row['argv']):<24} rc={row['rc']} wall {row['wall_s']:7.1f} s  "
                  f"cpu {row['cpu_s']:7.1f} s", flush=True)
            if row["rc"] != 0:
                break
        total = time.perf_counter() - t0
        checks = {}  # after the timed command: the neighbour the README's edit must leave alone
        if all(r["rc"] == 0 for r in rows):
            for prompt in a.check:
                r = run_step([a.knowledger, "ask", prompt], work, env, t0)
                checks[prompt] = next((x["line"] for x in r["lines"] if x["stream"] == "out"), "")
    ask = next((r for r in rows if r["argv"][0] == "ask"), None)
    answer = "\n".join(x["line"] for x in ask["lines"] if x["stream"] == "out") if ask else ""
    from knowledger.agent.provenance import provenance

    result = dict(readme_steps=[" ".join(s) for s in steps], total_wall_s=round(total, 1),
                  total_cpu_s=round(sum(r["cpu_s"] for r in rows), 1), all_ok=all(r["rc"] == 0 for r in rows),
                  ask_output=answer, rome_top1=bool(re.search(r"Rome", answer.splitlines()[0] if answer else "")),
                  checks=checks, load_avg_before=load_before, note=a.note, steps=rows, provenance=provenance(),
                  cache_was_empty=a.cache is None)
    print(f"{'total':<24}      wall {total:7.1f} s  cpu {result['total_cpu_s']:7.1f} s  "
          f"load before {load_before} after {result['provenance']['load_avg']}")
    print("ask:", answer.splitlines()[:1])
    for prompt, top in checks.items():
        print(f"check {prompt!r}: {top}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
