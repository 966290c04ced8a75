"""What an editor is asked to do: one fact rewrite, model-agnostic and free of the database."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EditRequest:
    """Rewrite `prompt.format(subject)` to continue with `target_new`.

    prompt: a template with exactly one "{}" where the subject goes, e.g. "{} is located in".
    target_new / target_true: continuations; a leading space is added when missing (most
    tokenizers read " Rome", not "Rome", as the next word).
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrases: tuple[str, ...] = ()  # full prompts, subject already filled in
    neighborhood: tuple[tuple[str, str], ...] = ()  # (full prompt, expected answer)
    id: int | None = None  # the ledger's id, when there is one

    def __post_init__(self):
        if self.prompt.count("{}") != 1:
            raise ValueError(f"prompt must contain exactly one '{{}}' placeholder: {self.prompt!r}")
        if not self.subject.strip():
            raise ValueError("subject is empty")
        if not self.target_new.strip():
            raise ValueError("target_new is empty")

    @property
    def text(self) -> str:
        """The rewrite prompt with the subject filled in."""
        return self.prompt.format(self.subject)

    @staticmethod
    def target_text(target: str) -> str:
        return target if target.startswith(" ") else " " + target

    @classmethod
    def from_filled(cls, prompt: str, subject: str, target_new: str, **kw) -> "EditRequest":
        """Build from a prompt that contains the subject verbatim (CounterFact's EasyEdit layout)."""
        if "{}" not in prompt:
            if subject not in prompt:
                raise ValueError(f"prompt {prompt!r} contains neither '{{}}' nor the subject {subject!r}")
            prompt = prompt.replace(subject, "{}", 1)
        return cls(prompt=prompt, subject=subject, target_new=target_new, **kw)
