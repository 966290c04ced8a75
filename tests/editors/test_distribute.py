"""Residual spreading over edited layers."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from knowledger.editors.distribute import Distribution, LastLayer, Uniform, get_distribution


def test_uniform_is_memits_spread():
    u = get_distribution("uniform")
    assert isinstance(u, Uniform) and u.name == "uniform"
    assert u.layers([3, 4, 5]) == (3, 4, 5)
    assert [u.share(i, 3) for i in range(3)] == pytest.approx([1 / 3, 1 / 2, 1.0])


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 12))
def test_uniform_gives_every_layer_an_equal_part_of_the_original_residual(n):
    u = Uniform()
    remaining, parts = 1.0, []
    for i in range(n):  # if each layer achieves its share, the remainder shrinks accordingly
        parts.append(u.share(i, n) * remaining)
        remaining -= parts[-1]
    assert parts == pytest.approx([1 / n] * n)
    assert remaining == pytest.approx(0.0, abs=1e-12)


def test_last_layer_selects_only_the_last():
    last = get_distribution("last")
    assert isinstance(last, LastLayer) and isinstance(last, Distribution)
    assert last.layers((3, 4, 5, 6)) == (6,)
    assert last.share(0, 1) == 1.0
    assert [last.share(i, 3) for i in range(3)] == [0.0, 0.0, 1.0]


def test_errors():
    with pytest.raises(ValueError, match="unknown distribution 'spread'.*last, sqrt, uniform"):
        get_distribution("spread")
    with pytest.raises(ValueError, match="ascending"):
        Uniform().layers([5, 4])
    with pytest.raises(ValueError, match="no edited layers"):
        LastLayer().layers([])
    with pytest.raises(ValueError, match="position"):
        Uniform().share(3, 3)


def test_sqrt_is_pmets_spread():
    s = get_distribution("sqrt")
    assert s.name == "sqrt" and s.layers([3, 4, 5]) == (3, 4, 5)
    assert [s.share(i, 3) for i in range(3)] == pytest.approx([3 ** -0.5, 2 ** -0.5, 1.0])
