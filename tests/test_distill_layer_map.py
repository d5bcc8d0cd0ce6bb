"""Layer mappings between teacher and student hidden-state lists."""

from __future__ import annotations

import pytest

from rosita_fast.distill import (
    LayerMapError,
    resolve_layer_map,
    rosita_layer_map,
    uniform_layer_map,
)


def test_method_12_to_8_mapping():
    # Method 4.2: teacher layers 2, 5, 8, 11 are skipped.
    assert rosita_layer_map(12, 8) == [0, 1, 3, 4, 6, 7, 9, 10, 12]


@pytest.mark.parametrize(("teacher", "student"), [(12, 8), (6, 4), (3, 2), (9, 6), (4, 3)])
def test_modulo_rule_properties(teacher, student):
    mapping = rosita_layer_map(teacher, student)
    ratio = teacher / student
    skipped = sorted(set(range(teacher + 1)) - set(mapping))
    assert len(mapping) == student + 1 and mapping[0] == 0 and mapping[-1] == teacher
    assert all(a < b for a, b in zip(mapping, mapping[1:], strict=False))
    for i in skipped:
        q = (i + 1) / ratio
        assert abs(q - round(q)) < 1e-9  # exactly the indices whose (i + 1) is a multiple


@pytest.mark.parametrize(("teacher", "student"), [(12, 4), (12, 6), (12, 12), (8, 8), (6, 1)])
def test_uniform_mapping(teacher, student):
    step = teacher // student
    assert uniform_layer_map(teacher, student) == list(range(0, teacher + 1, step))
    assert rosita_layer_map(teacher, student) == uniform_layer_map(teacher, student)


def test_mappings_that_do_not_fit_raise():
    with pytest.raises(LayerMapError, match="multiple of the student depth"):
        uniform_layer_map(12, 8)
    with pytest.raises(LayerMapError, match="explicit mapping"):
        rosita_layer_map(12, 5)
    with pytest.raises(LayerMapError, match="more student than teacher"):
        rosita_layer_map(4, 6)
    with pytest.raises(LayerMapError, match="needs 3"):
        resolve_layer_map([0, 2], 4, 2)
    with pytest.raises(LayerMapError, match="teacher hidden index 7"):
        resolve_layer_map([0, 2, 7], 4, 2)
    with pytest.raises(LayerMapError, match="student hidden index 3"):
        resolve_layer_map({3: 4}, 4, 2)
    with pytest.raises(LayerMapError, match="unknown layer mapping"):
        resolve_layer_map("tinybert", 4, 2)


def test_explicit_mappings():
    assert resolve_layer_map([0, 1, 4], 4, 2) == [(0, 0), (1, 1), (2, 4)]
    assert resolve_layer_map({2: 4, 1: 2}, 4, 2) == [(1, 2), (2, 4)]
    assert resolve_layer_map("rosita", 12, 8) == list(enumerate(rosita_layer_map(12, 8)))
