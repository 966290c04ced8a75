"""JSON for the agent's results: a JSON-safe copy of anything, dates as ISO strings.

`to_jsonable` is the one encoder behind every `--json`: a frozen result dataclass becomes its
`dataclasses.asdict`, enums their value, datetimes `iso`, tensors and numpy scalars floats, and
non-finite floats `null`.
"""
from __future__ import annotations

import dataclasses
import enum
import math
from datetime import datetime, timezone
from pathlib import PurePath


def iso(t: datetime | None) -> str | None:
    """A UTC timestamp as ISO 8601 to the second (naive times are taken as UTC)."""
    if t is None:
        return None
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).isoformat(timespec="seconds")


def json_safe(obj):
    """JSON-safe copy: tensors and numpy scalars to floats, non-finite floats to None."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (bool, int, str)) or obj is None:
        return obj
    try:
        x = float(obj)
    except (TypeError, ValueError):
        return str(obj)
    return x if math.isfinite(x) else None


def to_jsonable(obj):
    """What `--json` prints for an agent result: dataclasses, enums, dates, paths made plain."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, datetime):
        return iso(obj)
    if isinstance(obj, PurePath):
        return str(obj)
    return json_safe(obj)
