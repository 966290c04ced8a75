"""Where a number was measured: library versions, threads, CPU, load. Every benchmark JSON carries it.

`provenance()` is cheap (no model needed) and stdlib + torch only; `configure_threads()` applies
knowledger's thread rule once at process start (see docs/benchmarks.md, "Threads under load").
"""
from __future__ import annotations

import os
import platform
import sys


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance() -> dict:
    """Versions, threads, CPU and the 1/5/15-minute load average, as a JSON-able dict."""
    import torch

    try:
        import transformers
        tv = transformers.__version__
    except ImportError:  # pragma: no cover
        tv = None
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        load = None
    cuda = torch.cuda.is_available()
    return dict(python=sys.version.split()[0], torch=torch.__version__, transformers=tv,
                torch_threads=torch.get_num_threads(), interop_threads=torch.get_num_interop_threads(),
                omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
                omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
                cpu=cpu_model(), cpu_count=os.cpu_count(), load_avg=load, platform=platform.platform(),
                gpu=torch.cuda.get_device_name(0) if cuda else None)


def configure_threads() -> str | None:
    """knowledger's thread rule, applied once at process start (knowledger.agent's import).

    OpenMP threads that wait actively spin on their core between parallel regions; when another
    process holds one of the cores, every region then waits for a descheduled thread, and the
    time multiplies (measured here: a tiny-model sampling loop 0.68 s with one thread, 23.5 s with
    two on a busy machine, 0.86 s with two and OMP_WAIT_POLICY=PASSIVE; the default model's v*
    in docs/benchmarks.md, "Threads under load"). So: passive waiting, unless the user chose a
    policy. It must be in the environment before the OpenMP runtime starts (torch's import);
    returns the policy set, or None when torch was already loaded or the user had set one.
    """
    if "OMP_WAIT_POLICY" in os.environ or "torch" in sys.modules:
        return None
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return "PASSIVE"
