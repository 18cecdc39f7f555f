"""The one exception type that reaches users: its message says what happened and what to do."""


class ZipqError(Exception):
    """A user-facing error (bad input, missing model, impossible setting).

    The CLI prints it without a traceback and the app shows it as a message; anything else
    escaping the core is a bug.
    """
