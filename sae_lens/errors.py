"""User-facing errors."""


class SAELensError(ValueError):
    """A problem with the user's input, explained in one line (the CLI prints it without a traceback)."""
