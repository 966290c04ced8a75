"""Fact input: validation, fingerprints and the file readers (.jsonl, .csv, .json). Pure Python.

`validate_fact(...)` turns user input into a `Fact` or raises ValueError with a one-line reason.
`read_facts(path)` reads a whole file into `ParsedRow`s (line number + fact or error) without
stopping at the first bad row, so that callers choose: refuse the file, or keep the valid rows.
Dataset layouts (CounterFact, ROME, zsRE) are handled in knowledger.ledger.layouts.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from knowledger.ledger.errors import InvalidFacts
from knowledger.ledger.layouts import OUR_KEYS, fields_of

MAX_PROMPT = 1000  # characters: prompts, paraphrases, neighbours (zsRE answers can be long)
MAX_TEXT = 200  # characters, subject, targets, source
MAX_ITEMS = 100  # paraphrases or neighbours per fact
SUFFIXES = (".jsonl", ".csv", ".json")
TOO_DEEP = "JSON nested too deeply (a fact is at most a few levels deep)"


@dataclass(frozen=True)
class Fact:
    """One validated fact: rewrite `prompt.format(subject)` to continue with `target_new`.

    prompt: a template with exactly one "{}" where the subject goes (no other braces).
    Text fields are stripped of surrounding whitespace; target_true is None when unknown.
    paraphrases: full prompts (subject filled in); neighborhood: (full prompt, expected answer).
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrases: list[str] = field(default_factory=list)
    neighborhood: list[tuple[str, str]] = field(default_factory=list)
    source: str | None = None
    case_id: str | None = None

    @property
    def text(self) -> str:
        """The rewrite prompt with the subject filled in."""
        return self.prompt.format(self.subject)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.prompt, self.subject, self.target_new)


@dataclass(frozen=True)
class ParsedRow:
    """One row of a fact file: `line` (1-based, where the row starts) and a fact or an error."""

    line: int
    fact: Fact | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.fact is not None


def fingerprint(prompt: str, subject: str, target_new: str) -> str:
    """sha256 of the normalised (template, subject, target_new): NFKC, case-folded, spaces squeezed."""
    norm = [" ".join(unicodedata.normalize("NFKC", s).casefold().split())
            for s in (prompt, subject, target_new)]
    return hashlib.sha256("\x1f".join(norm).encode()).hexdigest()


# --- validation -----------------------------------------------------------------------------------
def validate_fact(prompt: Any = None, subject: Any = None, target_new: Any = None, target_true: Any = None,
                  paraphrases: Iterable[Any] = (), neighborhood: Iterable[Any] = (),
                  source: Any = None, case_id: Any = None) -> Fact:
    """A Fact from raw input, or ValueError naming the first problem in one line.

    A prompt without "{}" that contains the subject verbatim becomes a template (the first
    occurrence is replaced). "{}" in a paraphrase is filled with the subject. Neighbours are
    {"prompt": ..., "target": ...} objects or (prompt, target) pairs.
    """
    subject = _text("subject", subject, MAX_TEXT)
    prompt = _template(_text("prompt", prompt, MAX_PROMPT), subject)
    target_new = _text("target_new", target_new, MAX_TEXT)
    target_true = _text("target_true", target_true, MAX_TEXT, required=False)
    if target_true is not None and target_true.casefold() == target_new.casefold():
        raise ValueError(f"target_new equals target_true ({target_true!r})")
    paras = [_paraphrase(i, p, subject) for i, p in enumerate(_items("paraphrases", paraphrases))]
    neigh = [_neighbour(i, n) for i, n in enumerate(_items("neighborhood", neighborhood))]
    if isinstance(case_id, bool) or not isinstance(case_id, (str, int, type(None))):
        raise ValueError(f"case_id must be a string or an integer, got {type(case_id).__name__}")
    case = _text("case_id", str(case_id), 64, required=False) if case_id is not None else None
    return Fact(prompt=prompt, subject=subject, target_new=target_new, target_true=target_true,
                paraphrases=paras, neighborhood=neigh,
                source=_text("source", source, MAX_TEXT, required=False), case_id=case)


def parse_neighbor(text: str) -> tuple[str, str]:
    """'PROMPT=ANSWER' → (prompt, answer); split at the last '='."""
    prompt, sep, answer = text.rpartition("=")
    if not sep or not prompt.strip() or not answer.strip():
        raise ValueError(f"neighbour {text!r} must look like PROMPT=ANSWER")
    return prompt.strip(), answer.strip()


def _text(name: str, value: Any, limit: int, required: bool = True) -> str | None:
    if value is None:
        if required:
            raise ValueError(f"{name} is missing")
        return None
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {type(value).__name__}")
    value = value.strip()
    if not value:
        if required:
            raise ValueError(f"{name} is empty")
        return None
    if len(value) > limit:
        raise ValueError(f"{name} is too long ({len(value)} characters, at most {limit})")
    if "\x00" in value:
        raise ValueError(f"{name} contains a NUL character")
    return value


def _template(prompt: str, subject: str) -> str:
    n = prompt.count("{}")
    if n == 0:
        if subject not in prompt:
            raise ValueError(f"prompt contains neither '{{}}' nor the subject {subject!r}")
        prompt = prompt.replace(subject, "{}", 1)
    elif n > 1:
        raise ValueError(f"prompt has {n} '{{}}' placeholders; exactly one is allowed")
    rest = prompt.replace("{}", "")
    if "{" in rest or "}" in rest:
        raise ValueError("prompt has a '{' or '}' besides its one '{}' placeholder")
    if not rest.strip():
        raise ValueError("prompt has no words besides the subject")
    return prompt


def _items(name: str, value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, Iterable):
        raise ValueError(f"{name} must be a list, got {type(value).__name__}")
    items = list(value)
    if len(items) > MAX_ITEMS:
        raise ValueError(f"too many {name} ({len(items)}, at most {MAX_ITEMS})")
    return items


def _paraphrase(i: int, value: Any, subject: str) -> str:
    text = _text(f"paraphrases[{i}]", value, MAX_PROMPT)
    if "{}" in text:
        if text.count("{}") > 1:
            raise ValueError(f"paraphrases[{i}] has more than one '{{}}'")
        text = text.replace("{}", subject)
    return text


def _neighbour(i: int, value: Any) -> tuple[str, str]:
    if isinstance(value, dict):
        extra = set(value) - {"prompt", "target"}
        if extra:
            raise ValueError(f"neighborhood[{i}] has unknown key {sorted(extra)[0]!r} "
                             f"(expected prompt, target)")
        prompt, target = value.get("prompt"), value.get("target")
    elif isinstance(value, (list, tuple)) and len(value) == 2:
        prompt, target = value
    else:
        raise ValueError(f"neighborhood[{i}] must be {{\"prompt\": ..., \"target\": ...}}")
    return (_text(f"neighborhood[{i}].prompt", prompt, MAX_PROMPT),
            _text(f"neighborhood[{i}].target", target, MAX_PROMPT))


# --- files ---------------------------------------------------------------------------------------
def read_facts(path: str | Path) -> list[ParsedRow]:
    """Read every fact of a .jsonl, .csv or .json file, in file order.

    Returns one `ParsedRow(line, fact, error)` per row: `line` is the 1-based line where the row
    starts (for .json, where the list item starts); exactly one of `fact` (a `Fact`) and `error`
    (a one-line reason, e.g. "target_new is empty") is set. Rows are never dropped silently;
    blank lines of .jsonl/.csv are not rows. Each row's object may be in any layout of
    knowledger.ledger.layouts (ours, CounterFact EasyEdit or ROME, zsRE MEND; .csv: ours only).
    Problems with the file as a whole (unreadable, a directory, unsupported suffix, invalid UTF-8 in
    .csv/.json, malformed or too deeply nested .json, a bad .csv header, malformed CSV such as an
    unterminated quote, after which no later row could be trusted) raise InvalidFacts with one
    "name:line: reason" line.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise InvalidFacts([f"{path.name}: unsupported file type {path.suffix or '(none)'!r} "
                            f"(use {', '.join(SUFFIXES)})"])
    if path.is_dir():
        raise InvalidFacts([f"{path.name}: is a directory, not a fact file"])
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InvalidFacts([f"{path.name}: cannot read: {e.strerror or e}"]) from e
    reader = {".jsonl": _read_jsonl, ".csv": _read_csv, ".json": _read_json}[suffix]
    return list(reader(data, path.name))


def _row(line: int, fields: dict | None = None, error: str | None = None) -> ParsedRow:
    if error is not None:
        return ParsedRow(line, error=error)
    try:
        return ParsedRow(line, fact=validate_fact(**fields))
    except ValueError as e:
        return ParsedRow(line, error=str(e))


def _object_row(line: int, obj: Any) -> ParsedRow:
    try:
        fields = fields_of(obj)
    except ValueError as e:
        return ParsedRow(line, error=str(e))
    return _row(line, fields)


def _decode(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise InvalidFacts([f"{name}:{line}: {_utf8_problem(data, e)}"]) from e


def _utf8_problem(data: bytes, e: UnicodeDecodeError) -> str:
    column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
    return f"invalid UTF-8 (byte 0x{data[e.start]:02x} at column {column})"


def _read_jsonl(data: bytes, name: str) -> Iterator[ParsedRow]:
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for i, raw in enumerate(data.split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield ParsedRow(i, error=_utf8_problem(raw, e))
            continue
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            yield ParsedRow(i, error=f"malformed JSON: {e.msg} (column {e.colno})")
            continue
        except RecursionError:
            yield ParsedRow(i, error=TOO_DEEP)
            continue
        yield _object_row(i, obj)


def _read_json(data: bytes, name: str) -> Iterator[ParsedRow]:
    text = _decode(data, name)
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidFacts([f"{name}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})"]) from e
    except RecursionError:
        raise InvalidFacts([f"{name}:1: {TOO_DEEP}"]) from None
    if not isinstance(items, list):
        raise InvalidFacts([f"{name}:1: expected a JSON list of facts, got {type(items).__name__}"])
    for line, obj in zip(_item_lines(text), items):
        yield _object_row(line, obj)


def _item_lines(text: str) -> Iterator[int]:
    """The line on which each item of a (valid) top-level JSON list starts."""
    decoder, ws = json.JSONDecoder(), re.compile(r"[ \t\n\r]*")
    i = ws.match(text, text.index("[") + 1).end()
    line, last = 1, 0
    while i < len(text) and text[i] != "]":
        line, last = line + text.count("\n", last, i), i
        yield line
        _, end = decoder.raw_decode(text, i)
        i = ws.match(text, end).end()
        if i < len(text) and text[i] == ",":
            i = ws.match(text, i + 1).end()


_CSV_LISTS = ("paraphrases", "neighborhood")


def _read_csv(data: bytes, name: str) -> Iterator[ParsedRow]:
    reader = csv.reader(io.StringIO(_decode(data, name), newline=""), strict=True)
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        return
    except csv.Error as e:
        raise InvalidFacts([f"{name}:1: malformed CSV header: {e}"]) from e
    for column in header:
        if column not in OUR_KEYS:
            raise InvalidFacts([f"{name}:1: unknown column {column!r} (known: {', '.join(OUR_KEYS)})"])
    missing = [c for c in ("prompt", "subject") if c not in header]
    if not {"target", "target_new"} & set(header):
        missing.append("target_new")
    if missing:
        raise InvalidFacts([f"{name}:1: missing column {missing[0]!r}"])
    end = reader.line_num
    while True:
        start = end + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as e:  # e.g. an unterminated quote: the csv module cannot resynchronise,
            # so the rows after it would be lost silently: the whole file is refused, even with
            # --skip-invalid
            raise InvalidFacts([f"{name}:{start}: malformed CSV: {e} (an unterminated or stray quote?)"]) from e
        end = reader.line_num
        if not cells or all(not c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            yield ParsedRow(start, error=f"row has {len(cells)} cells, the header {len(header)}")
            continue
        try:
            obj = {k: _csv_cell(k, v) for k, v in zip(header, cells)}
        except ValueError as e:
            yield ParsedRow(start, error=str(e))
            continue
        yield _object_row(start, obj)


def _csv_cell(column: str, value: str) -> Any:
    if column not in _CSV_LISTS:
        return value
    value = value.strip()
    if not value:
        return []
    if value.startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{column} is not a valid JSON list: {e.msg}") from e
    parts = [p.strip() for p in value.split("|") if p.strip()]
    return [parse_neighbor(p) for p in parts] if column == "neighborhood" else parts
