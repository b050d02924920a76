"""Errors that carry a one-line message for the user.

The CLI catches :class:`UserError` and prints its message as one line, with no
traceback: a user's mistake (a missing folder, a wrong flag, a checkpoint that
does not fit) is reported, never dumped.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem caused by the user's input; ``str(err)`` is the one-line message.

    Args:
        message: what was wrong and where (which file, which flag) and, where
            possible, what to do about it.
    """

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.message
