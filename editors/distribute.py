"""How the residual spreads over the edited layers: a small strategy object per scheme.

MEMIT (Meng et al. 2023, Alg. 1): for edited layers l_1 < … < l_L, the editor visits them in order;
at l_i it recomputes the residual still missing at the target (last) layer and gives l_i the share
1/(L − i + 1) of it, so the layers not yet edited split what remains equally (1/L, …, 1/2, 1).
`Uniform` is that scheme; `LastLayer` edits only the last layer with the whole residual (ROME).
`SqrtRemaining` is PMET's (Li et al. 2024, "PMET: Precise Model Editing in a Transformer", §Method):
l_i gets 1/√(L − i + 1) of what remains (1/√L, …, 1/√2, 1), more than MEMIT's share at every layer
but the last, so the early layers carry more of the edit.

Positions are 0-based over the layers a Distribution selects: share(position, n) is the fraction
of the *remaining* residual given to the layer at that position.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar, Sequence


def _checked(edited_layers: Sequence[int]) -> tuple[int, ...]:
    layers = tuple(int(x) for x in edited_layers)
    if not layers:
        raise ValueError("no edited layers")
    if list(layers) != sorted(set(layers)):
        raise ValueError(f"edited layers must be ascending and unique: {layers}")
    return layers


def _check_position(position: int, n_layers: int) -> None:
    if not 0 <= position < n_layers:
        raise ValueError(f"position {position} is outside 0..{n_layers - 1}")


class Distribution(ABC):
    name: ClassVar[str]

    @abstractmethod
    def layers(self, edited_layers: Sequence[int]) -> tuple[int, ...]:
        """The layers (ascending) that actually get a delta, out of the configured ones."""

    @abstractmethod
    def share(self, position: int, n_layers: int) -> float:
        """Fraction of the remaining residual given to the selected layer at `position`."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Uniform(Distribution):
    """MEMIT's spread: every edited layer, the remaining residual split equally, 1/(n − position)."""

    name = "uniform"

    def layers(self, edited_layers: Sequence[int]) -> tuple[int, ...]:
        return _checked(edited_layers)

    def share(self, position: int, n_layers: int) -> float:
        _check_position(position, n_layers)
        return 1.0 / (n_layers - position)


class LastLayer(Distribution):
    """Only the last edited layer, with the whole residual."""

    name = "last"

    def layers(self, edited_layers: Sequence[int]) -> tuple[int, ...]:
        return _checked(edited_layers)[-1:]

    def share(self, position: int, n_layers: int) -> float:
        _check_position(position, n_layers)
        return 1.0 if position == n_layers - 1 else 0.0


class SqrtRemaining(Distribution):
    """PMET's spread: every edited layer, 1/√(n − position) of the remaining residual."""

    name = "sqrt"

    def layers(self, edited_layers: Sequence[int]) -> tuple[int, ...]:
        return _checked(edited_layers)

    def share(self, position: int, n_layers: int) -> float:
        _check_position(position, n_layers)
        return 1.0 / math.sqrt(n_layers - position)


DISTRIBUTIONS: dict[str, type[Distribution]] = {cls.name: cls for cls in (Uniform, LastLayer, SqrtRemaining)}


def get_distribution(name: str) -> Distribution:
    """The Distribution registered under `name` ("uniform", "last")."""
    try:
        return DISTRIBUTIONS[name]()
    except KeyError:
        raise ValueError(f"unknown distribution {name!r} (known: {', '.join(sorted(DISTRIBUTIONS))})") from None
