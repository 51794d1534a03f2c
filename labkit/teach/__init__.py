"""Teaching tools: exercise checks, metric recording, and student-notebook generation.

In a lesson notebook::

    from labkit.teach import check_close, record
    check_close("softmax", softmax(x), expected, hint="subtract the max before exp")
    record("success_rate", result.success_rate)

Instructors regenerate student copies with ``make student`` (``python -m labkit.teach.student``).
"""

from labkit.teach.checks import ExerciseFailed, check, check_close, check_shape, without
from labkit.teach.record import load_metrics, metrics, record

_STUDENT = ("make_student", "generate", "stale", "strip_outputs")


def __getattr__(name: str):
    # The generator needs nbformat, whose import costs ~1 s (jsonschema); notebooks only use checks
    # and record, so load it on first use.
    if name in _STUDENT:
        from labkit.teach import student

        return getattr(student, name)
    raise AttributeError(f"module 'labkit.teach' has no attribute {name!r}")


__all__ = [
    "record", "metrics", "load_metrics",
    "check", "check_close", "check_shape", "without", "ExerciseFailed",
    "make_student", "generate", "stale", "strip_outputs",
]
