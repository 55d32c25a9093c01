"""The project's exception for problems in the user's input (a file, a folder, a setting).

The CLI prints a `UserError` as one line naming the problem and exits 2; every other exception is a bug (or
an environment failure) and keeps its traceback. It derives from ValueError so code that catches ValueError
around a call into the library keeps working.
"""

from __future__ import annotations

# OS errors about a path the user gave (an --out that is a file, a missing input): shown as one line as well.
USER_PATH_ERRORS: tuple[type[OSError], ...] = (FileNotFoundError, FileExistsError, NotADirectoryError,
                                               IsADirectoryError, PermissionError)


class UserError(ValueError):
    """Bad input from the user: the message names the file or setting and what is wrong with it."""


class CheckpointError(UserError):
    """A checkpoint file that cannot be read or does not fit the model; the message names the file."""


class SetupError(UserError, RuntimeError):
    """This machine cannot do what the settings ask (no GPU, launcher variables missing, an optional package)."""


def is_user_error(e: BaseException) -> bool:
    """True for errors that the CLI reports as one line: UserError and OS errors about the user's paths."""
    return isinstance(e, (UserError, *USER_PATH_ERRORS))
