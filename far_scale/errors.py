"""The base of errors whose message names the bad input and says what to do (a leaf module).

The CLI prints such an error as one ``error:`` line, without a traceback, and exits 1.
"""


class ActionableError(Exception):
    """Raised for bad input or a damaged file; the message names it and the fix."""
