"""Dataset layouts of a fact: one JSON object → the keyword arguments of `facts.validate_fact`.

Four layouts are recognised per object, by their keys:
- knowledger's own: prompt, subject, target_new (alias target), target_true, paraphrases (list of
  full prompts), neighborhood (list of {"prompt", "target"}), source, case_id. Unknown keys are
  errors.
- CounterFact, EasyEdit layout (has ground_truth / rephrase_prompt / locality_prompt): prompt with the
  subject verbatim, subject, target_new, ground_truth, rephrase_prompt, locality_prompt,
  locality_ground_truth, case_id.
- CounterFact, original ROME layout (has requested_rewrite): requested_rewrite {prompt with "{}",
  subject, target_new {str}, target_true {str}}, paraphrase_prompts, neighborhood_prompts (their
  expected answer is target_true), case_id.
- zsRE, MEND layout (has src): subject, src (the question), rephrase, alt (the new answer), answers
  (the old ones), loc, loc_ans. The template is src with the subject replaced by "{}"; a row whose
  src does not contain the subject is invalid.
Other keys of the three benchmark layouts (pred, cond, attribute_prompts, ...) are ignored.
"""
from __future__ import annotations

from typing import Any

OUR_KEYS = ("prompt", "subject", "target_new", "target", "target_true", "paraphrases",
            "neighborhood", "source", "case_id")


def layout_of(obj: dict) -> str:
    if "requested_rewrite" in obj:
        return "rome"
    if "src" in obj:
        return "zsre"
    if obj.keys() & {"ground_truth", "rephrase_prompt", "locality_prompt", "locality_ground_truth"}:
        return "counterfact"
    return "knowledger"


def fields_of(obj: Any) -> dict:
    """The fields of one fact object in any layout above; ValueError names what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {_kind(obj)}")
    return {"knowledger": _ours, "counterfact": _counterfact, "rome": _rome, "zsre": _zsre}[
        layout_of(obj)](obj)


def _ours(obj: dict) -> dict:
    unknown = [k for k in obj if k not in OUR_KEYS]
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} (known: {', '.join(OUR_KEYS)})")
    if "target" in obj and "target_new" in obj:
        raise ValueError("both 'target' and 'target_new' given; use one")
    out = {k: obj[k] for k in OUR_KEYS if k in obj and k != "target"}
    if "target" in obj:
        out["target_new"] = obj["target"]
    return out


def _counterfact(obj: dict) -> dict:
    rephrase = _as_list(obj.get("rephrase_prompt"))
    loc_prompts = _as_list(obj.get("locality_prompt"))
    loc_answers = _as_list(obj.get("locality_ground_truth"))
    if len(loc_answers) == 1 and len(loc_prompts) > 1:
        loc_answers = loc_answers * len(loc_prompts)
    if len(loc_prompts) != len(loc_answers):
        raise ValueError(f"{len(loc_prompts)} locality_prompt but {len(loc_answers)} "
                         f"locality_ground_truth")
    return dict(prompt=obj.get("prompt"), subject=obj.get("subject"),
                target_new=obj.get("target_new"), target_true=_first(obj.get("ground_truth")),
                paraphrases=rephrase, neighborhood=list(zip(loc_prompts, loc_answers)),
                case_id=obj.get("case_id"))


def _rome(obj: dict) -> dict:
    rw = obj["requested_rewrite"]
    if not isinstance(rw, dict):
        raise ValueError(f"requested_rewrite must be an object, got {_kind(rw)}")
    target_true = _str_field(rw.get("target_true"))
    neighbours = _as_list(obj.get("neighborhood_prompts"))
    if neighbours and target_true is None:
        raise ValueError("neighborhood_prompts need requested_rewrite.target_true (their answer)")
    return dict(prompt=rw.get("prompt"), subject=rw.get("subject"),
                target_new=_str_field(rw.get("target_new")), target_true=target_true,
                paraphrases=_as_list(obj.get("paraphrase_prompts")),
                neighborhood=[(p, target_true) for p in neighbours], case_id=obj.get("case_id"))


def _zsre(obj: dict) -> dict:
    src, subject = obj.get("src"), obj.get("subject")
    if isinstance(src, str) and isinstance(subject, str) and subject.strip() \
            and "{}" not in src and subject.strip() not in src:
        raise ValueError(f"zsRE src does not contain the subject {subject.strip()!r}")
    loc, loc_ans = obj.get("loc"), _first(obj.get("loc_ans"))
    return dict(prompt=src, subject=subject, target_new=_first(obj.get("alt")),
                target_true=_first(obj.get("answers")), paraphrases=_as_list(obj.get("rephrase")),
                neighborhood=[(loc, loc_ans)] if loc else [], case_id=obj.get("case_id"))


# --- helpers --------------------------------------------------------------------------------------
def _as_list(value: Any) -> list:
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _first(value: Any) -> Any:
    """A scalar, or the first item of a list (zsRE's answers, EasyEdit's list-valued fields)."""
    if isinstance(value, (list, tuple)):
        return value[0] if value else None
    return value


def _str_field(value: Any) -> Any:
    """ROME's {"str": ..., "id": ...} targets, or a plain value."""
    return value.get("str") if isinstance(value, dict) else value


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number")
