"""User-facing errors.

Every problem caused by the user's input (model, config, data, paths) is raised as
:class:`LowbitError` with a message that names the culprit. The CLI turns it into a
one-line message and exit code 2; anything else escaping is a bug in lowbit.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LowbitError(Exception):
    """An error in what the user gave lowbit, reported without a traceback."""


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """Return " (did you mean 'x'?)" for the closest candidate, or "" when none is close."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def closest(word: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """The up-to-n candidates closest to word, best first."""
    return difflib.get_close_matches(word, list(candidates), n=n, cutoff=0.5)


class LowbitWarning(UserWarning):
    """Something the user may want to fix, that does not stop the job."""
