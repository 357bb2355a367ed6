"""The one exception type slmquant raises for bad input: the CLI prints its message on one line."""


class SlmquantError(Exception):
    """A user-facing error: unknown model, unsupported bits, missing data, corrupted cache, ..."""
