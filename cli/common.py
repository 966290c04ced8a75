"""Shared pieces of the CLI: the one error funnel, the global output options, the --db, --json and
--device options, JSON output, and escaping of text that came from users.

The error funnel (`run_funnelled`, used by the `knowledger` group in cli/main.py) turns every
failure into ONE line on stderr, `Error: ...`, and an exit status: 2 for a usage error, 1 for
everything else (domain errors, files that cannot be read or written, a missing database driver,
a model that does not load, input that does not parse). `-v` prints the traceback first. Under
`--json` the error is a JSON object on stdout instead: {"error": "...", "kind": "..."}.
"""
from __future__ import annotations

import errno
import json
import sys
import traceback
import unicodedata
from dataclasses import dataclass
from typing import Any

import click

from knowledger.agent.errors import DatabaseError, KnowledgerError
from knowledger.agent.jsonutil import to_jsonable

INT64 = 2**63 - 1
POSTGRES_DRIVERS = ("psycopg", "psycopg2", "psycopg_binary", "pg8000", "asyncpg")

db_option = click.option(
    "--db", metavar="URL|PATH", envvar="KNOWLEDGER_DB", show_envvar=True,
    help="Workspace: a directory, a .db file or a SQLAlchemy URL [default: ./.knowledger].")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
device_option = click.option(
    "--device", metavar="DEVICE", default=None,
    help="Where to compute: cpu, cuda, cuda:1, ... [default: CUDA when present, else the CPU].")


def seq_type(metavar_min: int = 1) -> click.IntRange:
    """An operation seq or fact id: a positive integer that fits the database."""
    return click.IntRange(metavar_min, INT64)


# --- output options -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Output:
    """The global output options (`knowledger -v ...`, `knowledger --quiet ...`)."""

    quiet: bool = False
    verbose: int = 0


def output() -> Output:
    ctx = click.get_current_context(silent=True)
    obj = ctx.find_root().obj if ctx is not None else None
    return obj if isinstance(obj, Output) else Output()


def silence_third_party(verbose: int) -> None:
    """transformers' and huggingface_hub's bars and warnings off, unless -v."""
    import logging
    import os

    if verbose:
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # third-party bars (transformers' GGUF loader); ours pass disable=False
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for name in ("transformers", "huggingface_hub", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import warnings

    for category in (FutureWarning, DeprecationWarning, UserWarning):  # e.g. transformers' past_key_values
        warnings.filterwarnings("ignore", category=category, module=r"(torch|transformers|accelerate|huggingface_hub)(\.|$)")
    if "transformers" in sys.modules:  # already imported: set it there too
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def note(line: str) -> None:
    """A note on stderr (never on stdout, so JSON stays parseable); --quiet drops it."""
    if not output().quiet:
        click.echo(f"note: {clean(line)}", err=True)


def notes(lines) -> None:
    for line in lines:
        note(line)


def progress():
    """The Progress callable the agent reports to (cli.progress), or None under --quiet."""
    from knowledger.cli.progress import make_progress

    out = output()
    return None if out.quiet else make_progress()


# --- JSON and text -------------------------------------------------------------------------------
def echo_json(obj: Any) -> None:
    """Print an agent result as JSON: frozen dataclasses as their fields (agent.jsonutil)."""
    click.echo(json.dumps(to_jsonable(obj), indent=2, ensure_ascii=False, default=str))


def clean(text: Any) -> str:
    """Text from users, safe for a terminal: control and format characters (ESC, BEL, bidi
    overrides, ...) escaped as \\xNN / \\uNNNN; newlines and tabs too."""
    s = str(text)
    if s.isprintable():
        return s
    out = []
    for ch in s:
        if ch.isprintable() or unicodedata.category(ch) == "Zs":
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def short_sha(sha: str | None) -> str:
    return sha[:12] if sha else "-"


# --- the error funnel -----------------------------------------------------------------------------
def describe(e: BaseException) -> tuple[str, str, int]:
    """(one-line message, kind, exit status) for any exception a command let through."""
    if isinstance(e, click.UsageError):  # the message alone: `-h` says the rest
        return " ".join(e.format_message().split("\n")), "usage", 2
    if isinstance(e, click.ClickException):
        return e.format_message(), "error", e.exit_code
    if isinstance(e, KnowledgerError):
        return str(e), type(e).__name__, 1
    if isinstance(e, ModuleNotFoundError | ImportError):
        name = (getattr(e, "name", None) or "").split(".")[0]
        if name in POSTGRES_DRIVERS or "psycopg" in str(e):
            return ('the PostgreSQL driver is not installed: pip install "knowledger[postgres]"',
                    "dependency", 1)
        return f"a Python package is missing: {e}", "dependency", 1
    if isinstance(e, OSError):
        return _os_error(e), "os", 1
    if isinstance(e, DatabaseError):
        orig = getattr(e, "orig", None) or e
        if isinstance(orig, ModuleNotFoundError | ImportError):
            return describe(orig)
        return f"database error: {str(orig).splitlines()[0] if str(orig) else type(orig).__name__}", "database", 1
    if isinstance(e, RecursionError):
        return "the input is nested too deeply to read", "input", 1
    if isinstance(e, OverflowError):
        return f"a number is too large: {e}", "input", 1
    if type(e).__name__ in ("SafetensorError", "HeaderTooLarge") or "safetensors" in type(e).__module__:
        return f"cannot read the model's weights (safetensors): {e}", "model", 1
    if type(e).__module__.startswith("_csv") or type(e).__name__ == "Error" and "csv" in type(e).__module__:
        return f"CSV: {e}", "input", 1
    if isinstance(e, ValueError):
        return str(e) or type(e).__name__, "input", 1
    return (f"internal error: {type(e).__name__}: {e} (run `knowledger -v ...` for the traceback)",
            "internal", 1)


def _os_error(e: OSError) -> str:
    what = e.strerror or str(e) or type(e).__name__
    name = e.filename if e.filename is not None else None
    fix = {errno.EACCES: "check the file's permissions", errno.EPERM: "check the file's permissions",
           errno.ENOSPC: "free some disk space", errno.EROFS: "the file system is read-only",
           errno.ENOENT: None}.get(e.errno)
    line = f"{what}: {name}" if name else what
    return line + (f" ({fix})" if fix else "")


def first_line(message: str) -> str:
    lines = [ln for ln in str(message).splitlines() if ln.strip()]
    return lines[0] if lines else str(message)


def report_error(e: BaseException, *, as_json: bool, verbose: int) -> int:
    """Print an exception the funnel caught (see the module docstring); return the exit status."""
    message, kind, code = describe(e)
    if verbose and not isinstance(e, click.UsageError):
        traceback.print_exception(e, file=sys.stderr)
    if as_json:
        click.echo(json.dumps(dict(error=message, kind=kind), ensure_ascii=False))
    else:  # InvalidFacts lists one problem per line: the only multi-line error, on purpose
        text = message if "\n" in message else clean(message)
        click.echo(f"Error: {text}", err=True)
    return code


def main_errors(func):
    """Kept for commands' decorators: the funnel itself lives in the group (cli/main.py)."""
    return func
