"""The one exception type users see: a single line saying what is wrong and how to fix it."""


class OrtuneError(Exception):
    """Raised for bad input or configuration; stage entry points print it as one line and exit 2."""
