"""The one base type of every error a user can cause and fix (bad data, a missing model, a locked bank, a wrong
flag value). The CLI turns these into one line on stderr and exit code 2; any other exception is a bug and shows
its traceback. Each module keeps its own subclass (``BankError``, ``ModelError`` ...; ``DataError`` is here because both
:mod:`~lifealign_lite.data` and :mod:`~lifealign_lite.readers` raise it), which also
derives from the built-in type it was before (``ValueError`` or ``RuntimeError``) so existing ``except`` clauses
keep working.
"""

from __future__ import annotations

from typing import Iterable

MAX_SHOWN_PROBLEMS = 20  # lines of a DataError shown before "... and N more problems"


class LifeAlignError(Exception):
    """Something the user caused and can fix; the message is one line saying what is wrong and what to do."""


class InputError(LifeAlignError, ValueError):
    """A value given by the user (a flag, an argument, a request setting) that is out of range or malformed."""


class BenchError(LifeAlignError, ValueError):
    """A benchmark that cannot run as asked (missing data, unknown variant or method, an --out of another bench)."""


class DataError(LifeAlignError, ValueError):
    """Invalid preference data.

    ``.problems`` is a list of one-line strings, each ``'FILE:LINE: what is
    wrong; what to do'`` (or ``'FILE: ...'`` for whole-file problems).
    ``str(err)`` joins them with newlines, showing at most 20 and then
    ``'... and N more problems'``.
    """

    def __init__(self, problems: Iterable[str]):
        self.problems: list[str] = [str(p) for p in problems]
        super().__init__(self._render())

    def _render(self) -> str:
        shown = self.problems[:MAX_SHOWN_PROBLEMS]
        rest = len(self.problems) - len(shown)
        lines = list(shown)
        if rest > 0:
            lines.append(f"... and {rest} more problem{'s' if rest != 1 else ''}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self._render()
