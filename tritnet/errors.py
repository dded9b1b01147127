"""The root of every error tritnet raises on purpose.

An error that derives from `TritnetError` is a user's error, not a bug: its message names the
thing, the value and the fix, and is the whole story. The CLI prints it as one line and exits
1; the data-parallel launcher re-raises a rank's as it was raised there. Any other exception is
a bug and keeps its traceback.

Each class also derives from the built-in its callers catch (ConfigError is a ValueError,
DeviceError a RuntimeError, ...), so `except ValueError` still works where it did.
"""


class TritnetError(Exception):
    """A run, a file or a value that tritnet refuses; the message says what and how to fix it."""
