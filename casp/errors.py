"""User-facing errors.

A :class:`CaspError` is a mistake the user can fix (a wrong path, an impossible setting).
The command line prints its message as one line and exits non-zero, without a traceback.
"""


class CaspError(Exception):
    """An error caused by user input; its message names the problem and the fix."""
