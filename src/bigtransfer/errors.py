"""The project's exception for problems in the user's input (a file, a folder, a setting).

The CLI prints a `UserError` as one line naming the problem and exits 2; every other exception is a bug (or
an environment failure) and keeps its traceback. It derives from ValueError so code that catches ValueError
around a call into the library keeps working.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user: the message names the file or setting and what is wrong with it."""
