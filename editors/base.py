"""The editor protocol: what every editor offers the agent, whatever it computes with.

The closed-form editors (editors.editor.Editor: MEMIT, EMMET, ROME, PMET, AlphaEdit, ENCORE) and
the hyper-network one (editors.malmen.MalmenEditor) both implement it, so the agent's apply,
undo, replay and benchmark treat them alike (peft's BaseTuner plays this part for adapters):

    result = editor.compute(requests, memory=mem if editor.reads_memory else None, progress=cb)

compute() returns an EditResult (factored deltas in math orientation, the keys and values used)
and never leaves the model changed; editors.apply writes the deltas. `progress` is an
editors.progress.Progress: progress(phase, done, total).
"""
from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

from .memory import KeyMemory
from .model_spec import ModelSpec
from .progress import Progress
from .requests import EditRequest
from .result import EditResult


@runtime_checkable
class ModelEditor(Protocol):
    method: str  # its name in editors.methods.METHODS
    layers: tuple[int, ...]  # the layers whose MLP output projection it edits, ascending
    spec: ModelSpec  # the architecture table entry of the model it edits
    reads_memory: bool  # whether compute() reads the past-edit memory

    def compute(self, requests: Sequence[EditRequest], *, memory: KeyMemory | None = None,
                progress: Progress | None = None) -> EditResult:
        """Deltas for a batch of facts; the model is left exactly as it was."""
        ...
