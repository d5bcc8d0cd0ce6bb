"""Which teacher hidden state each student hidden state is distilled from (method 4.2).

Hidden-state lists have ``L + 1`` entries: index 0 is the embedding output, index ``m`` the output
of layer ``m``. A mapping is a list ``g`` with ``g[m]`` = teacher index for student index ``m``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fractions import Fraction

LayerMapSpec = str | Sequence[int] | Mapping[int, int]


class LayerMapError(ValueError):
    """A layer mapping that does not fit the teacher and student depths."""


def _check_depths(n_teacher: int, n_student: int) -> None:
    if n_student < 1 or n_teacher < 1:
        raise LayerMapError(f"layer counts must be positive; got teacher {n_teacher}, "
                            f"student {n_student}")
    if n_student > n_teacher:
        raise LayerMapError(f"a {n_student}-layer student cannot be mapped onto a "
                            f"{n_teacher}-layer teacher (more student than teacher layers)")


def uniform_layer_map(n_teacher: int, n_student: int) -> list[int]:
    """``g(m) = m * n_teacher / n_student``; needs ``n_teacher`` to be a multiple of ``n_student``.

    Raises:
        LayerMapError: the depths do not divide.
    """
    _check_depths(n_teacher, n_student)
    if n_teacher % n_student:
        raise LayerMapError(
            f"uniform mapping needs the teacher depth ({n_teacher}) to be a multiple of the "
            f"student depth ({n_student}); use 'rosita' or an explicit list"
        )
    step = n_teacher // n_student
    return [m * step for m in range(n_student + 1)]


def rosita_layer_map(n_teacher: int, n_student: int) -> list[int]:
    """The method's rule: uniform when the depths divide; otherwise skip every teacher index ``i``
    with ``(i + 1) mod (n_teacher / n_student) == 0`` and pair the rest in order.

    For 12 -> 8 this gives ``[0, 1, 3, 4, 6, 7, 9, 10, 12]``.

    Raises:
        LayerMapError: the rule leaves fewer teacher states than the student has, or does not
            pair the last layers (the rule only makes sense for ratios like 1.5).
    """
    _check_depths(n_teacher, n_student)
    if n_teacher % n_student == 0:
        return uniform_layer_map(n_teacher, n_student)
    ratio = Fraction(n_teacher, n_student)  # exact: a float ratio misses zeros of the modulo
    kept = [i for i in range(n_teacher + 1) if Fraction(i + 1) % ratio != 0]
    mapping = kept[: n_student + 1]
    if len(mapping) < n_student + 1 or mapping[-1] != n_teacher:
        raise LayerMapError(
            f"the method's modulo rule does not map a {n_student}-layer student onto a "
            f"{n_teacher}-layer teacher last-to-last (it gives {kept}); give an explicit mapping"
        )
    return mapping


def resolve_layer_map(spec: LayerMapSpec, n_teacher: int, n_student: int) -> list[tuple[int, int]]:
    """Turn a mapping spec into ``(student_index, teacher_index)`` pairs over hidden-state lists.

    Args:
        spec: ``"uniform"``, ``"rosita"`` (the method's rule, uniform where possible), a sequence
            of ``n_student + 1`` teacher indices, or a dict ``{student_index: teacher_index}``
            (only the listed student states are distilled).
        n_teacher, n_student: numbers of *layers* (hidden-state lists have one more entry).

    Raises:
        LayerMapError: unknown name, wrong length, or an index out of range.
    """
    if isinstance(spec, str):
        if spec == "uniform":
            return list(enumerate(uniform_layer_map(n_teacher, n_student)))
        if spec == "rosita":
            return list(enumerate(rosita_layer_map(n_teacher, n_student)))
        raise LayerMapError(f"unknown layer mapping {spec!r}; use 'uniform', 'rosita', a list or "
                            "a dict")
    if isinstance(spec, Mapping):
        pairs = sorted((int(s), int(t)) for s, t in spec.items())
    else:
        targets = [int(t) for t in spec]
        if len(targets) != n_student + 1:
            raise LayerMapError(
                f"explicit layer mapping has {len(targets)} entries; a {n_student}-layer student "
                f"needs {n_student + 1} (embedding output + one per layer)"
            )
        pairs = list(enumerate(targets))
    for s, t in pairs:
        if not 0 <= s <= n_student:
            raise LayerMapError(f"student hidden index {s} is outside 0..{n_student}")
        if not 0 <= t <= n_teacher:
            raise LayerMapError(f"teacher hidden index {t} (for student {s}) is outside "
                                f"0..{n_teacher}")
    return pairs
