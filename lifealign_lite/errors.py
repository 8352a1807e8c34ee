"""The one base type of every error a user can cause and fix (bad data, a missing model, a locked bank, a wrong
flag value). The CLI turns these into one line on stderr and exit code 2; any other exception is a bug and shows
its traceback. Each module keeps its own subclass (``DataError``, ``BankError``, ``ModelError`` ...), which also
derives from the built-in type it was before (``ValueError`` or ``RuntimeError``) so existing ``except`` clauses
keep working.
"""

from __future__ import annotations


class LifeAlignError(Exception):
    """Something the user caused and can fix; the message is one line saying what is wrong and what to do."""


class InputError(LifeAlignError, ValueError):
    """A value given by the user (a flag, an argument, a request setting) that is out of range or malformed."""


class BenchError(LifeAlignError, ValueError):
    """A benchmark that cannot run as asked (missing data, unknown variant or method, an --out of another bench)."""
