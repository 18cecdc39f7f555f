"""The exceptions that reach users: their message says what happened and what to do."""


class ZipqError(Exception):
    """A user-facing error (bad input, missing model, impossible setting).

    The CLI prints it without a traceback and the app shows it as a message; anything else
    escaping the core is a bug.
    """


class Cancelled(ZipqError):
    """A stage stopped because its cancel event was set: not a failure, nothing to fix."""
