"""The one kind of error a learner can fix: bad input, a bad option, a broken file or run folder.

Raise :class:`UserError` with a message that says what is wrong, where (the file and line, or the option) and what
to do. The command line prints such an error as one line and exits with status 2; anything else is a bug and shows
its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem in the user's input, options or files; the message is meant to be read as it is."""
