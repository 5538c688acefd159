"""User errors end a command with the message that names the file, id, class or value, not a config traceback.

MONAI evaluates a bundle's configs inside expressions, so an error in the input reaches the console wrapped in
hundreds of lines ending in ``Failed to evaluate ConfigExpression``. Errors the user can fix are raised as
:class:`IrisInputError`; the hook below prints just the message, and the command exits with status 1. The entry points
switch it on (:func:`install`: the configs' run lists, ``scripts/segment.py``, the MONAI Label app); importing the
package does not. Any other exception, a bug, keeps its full traceback, as does every error with
``IRIS_TRACEBACK=1``.
"""

from __future__ import annotations

import os
import sys
from types import TracebackType


class IrisInputError(ValueError):
    """An error in what the user gave (a file, an id, a class, a value); its message says what and how to fix it."""


def user_error(error: BaseException | None) -> IrisInputError | None:
    """The :class:`IrisInputError` that ``error`` is or wraps (through ``__cause__``/``__context__``), if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, IrisInputError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _excepthook(kind: type[BaseException], error: BaseException, traceback: TracebackType | None) -> None:
    found = user_error(error)
    if found is None or os.environ.get("IRIS_TRACEBACK"):
        _previous_hook(kind, error, traceback)
        return
    print(f"Error: {found}\n(IRIS_TRACEBACK=1 shows the full traceback.)", file=sys.stderr)


_previous_hook = sys.excepthook


def install() -> None:
    """Print user errors in short for the rest of this process (idempotent)."""
    if sys.excepthook is not _excepthook:
        sys.excepthook = _excepthook


def require_switches(**switches: object) -> dict[str, bool]:
    """Refuse an on/off id whose value is not a bool, before any work starts; return the switches.

    MONAI's command line (python-fire) reads ``--resume False`` as a bool but ``--resume false`` as the text
    ``"false"``, which Python counts as on: the run would resume, or crash far into it (``--amp false``).
    """
    wrong = {name: value for name, value in switches.items() if not isinstance(value, bool)}
    if wrong:
        problems = "; ".join(
            f"--{name} got {value!r}"
            + (f", write --{name} {value.strip().capitalize()}" if _is_bool_text(value) else "")
            for name, value in wrong.items()
        )
        raise IrisInputError(
            f"On/off ids take True or False: {problems}. MONAI's command line reads lowercase true/false as text, "
            "and any text counts as on."
        )
    return {name: bool(value) for name, value in switches.items()}


def _is_bool_text(value: object) -> bool:
    return isinstance(value, str) and value.strip().lower() in ("true", "false")
