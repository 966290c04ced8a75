"""Forward hooks as context managers, addressed by dotted module names (baukit's nethook idea).

    with TraceDict(model, [spec.mlp_out_name(i) for i in layers], retain_input=True, stop=True) as td:
        model(**batch)                      # stops once every traced module has run
    K = td[spec.mlp_out_name(4)].input      # (batch, seq, d_in)

    with Trace(model, spec.layer(8), edit_output=add_delta) as tr:
        logits = model(**batch).logits      # layer 8's output changed by add_delta(output, name)

Hooks are registered on enter and removed on exit, also when the body raises. `stop=True` raises
a private exception once every traced module has run in the current forward pass; the context
manager swallows it, so the layers above (and the LM head) never run and the call simply returns
nothing. Code after the forward call inside the `with` block does not run in that case: read the
retained tensors after the block.

Modules may return a tensor or a tuple whose first element is the hidden state (decoder layers
return a tensor in transformers 5 and a tuple before). `Traced.output` is always that main tensor,
and `edit_output(output, name)` receives and returns it; the rest of a tuple is passed through.
Inputs are read from the first positional argument, else from a `hidden_states` / first tensor
keyword argument.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

EditOutput = Callable[[torch.Tensor, str], torch.Tensor]


class _StopForward(Exception):
    """Raised inside a forward pass once every traced module has run; swallowed by the tracer."""


@dataclass
class Traced:
    """What one traced module saw in the latest forward pass."""

    name: str
    input: torch.Tensor | None = None
    output: torch.Tensor | None = None
    calls: int = 0  # forward calls of this module while traced


def _main_tensor(x):
    """The hidden state in a module's output: the tensor itself, or a tuple's first element."""
    if isinstance(x, (tuple, list)):
        return x[0]
    return x


def _first_input(args: tuple, kwargs: dict):
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)


def _keep(t, detach: bool, clone: bool):
    if not isinstance(t, torch.Tensor):
        return t
    if detach:
        t = t.detach()
    return t.clone() if clone else t


class TraceDict(dict):
    """A context manager tracing several modules; maps each dotted name to its `Traced` record.

    retain_input / retain_output: keep each module's input / (possibly edited) output tensor.
    edit_output: `f(output, name) -> new output`, applied to every traced module's main tensor.
    stop: end the forward pass once all traced modules have run (see the module docstring).
    detach: retained tensors are detached from the autograd graph (pass False to keep gradients).
    clone: retain copies (needed only when something later modifies the tensors in place).
    """

    def __init__(self, model: nn.Module, names: Iterable[str], retain_input: bool = False,
                 retain_output: bool = True, edit_output: EditOutput | None = None,
                 stop: bool = False, detach: bool = True, clone: bool = False):
        names = list(dict.fromkeys(names))
        if not names:
            raise ValueError("TraceDict needs at least one module name")
        super().__init__((name, Traced(name)) for name in names)
        self._modules = {name: model.get_submodule(name) for name in names}  # fails early on a typo
        self._model = model
        self._retain_input, self._retain_output = retain_input, retain_output
        self._edit_output, self._stop = edit_output, stop
        self._detach, self._clone = detach, clone
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._fired: set[str] = set()

    def __enter__(self) -> "TraceDict":
        if self._handles:
            raise RuntimeError("TraceDict is not re-entrant")
        try:
            if self._stop:  # a new forward pass of the whole model starts a new round
                self._handles.append(self._model.register_forward_pre_hook(self._new_pass))
            for name, module in self._modules.items():
                self._handles.append(
                    module.register_forward_hook(self._make_hook(name), with_kwargs=True))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._remove()
        return exc_type is not None and issubclass(exc_type, _StopForward)

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._fired.clear()

    def _new_pass(self, module, args) -> None:
        self._fired.clear()

    def _make_hook(self, name: str):
        record = self[name]

        def hook(module, args, kwargs, output):
            record.calls += 1
            if self._retain_input:
                record.input = _keep(_first_input(args, kwargs), self._detach, self._clone)
            main = _main_tensor(output)
            if self._edit_output is not None:
                new = self._edit_output(main, name)
                if new is not main:
                    if isinstance(output, (tuple, list)):
                        output = type(output)([new, *output[1:]])
                    else:
                        output = new
                    main = new
            if self._retain_output:
                record.output = _keep(main, self._detach, self._clone)
            if self._stop:
                self._fired.add(name)
                if len(self._fired) == len(self._modules):
                    self._fired.clear()
                    raise _StopForward()
            return output

        return hook


class Trace:
    """A context manager tracing one module; `.input` and `.output` as in `TraceDict`."""

    def __init__(self, model: nn.Module, name: str, retain_input: bool = False,
                 retain_output: bool = True, edit_output: EditOutput | None = None,
                 stop: bool = False, detach: bool = True, clone: bool = False):
        self.name = name
        self._dict = TraceDict(model, [name], retain_input=retain_input,
                               retain_output=retain_output, edit_output=edit_output, stop=stop,
                               detach=detach, clone=clone)

    def __enter__(self) -> "Trace":
        self._dict.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        return self._dict.__exit__(exc_type, exc, tb)

    @property
    def input(self) -> torch.Tensor | None:
        return self._dict[self.name].input

    @property
    def output(self) -> torch.Tensor | None:
        return self._dict[self.name].output

    @property
    def calls(self) -> int:
        return self._dict[self.name].calls
