"""The one exception type for a user's mistake.

The CLI catches it, prints its message on one line and exits with code 2, so a
bad flag, YAML key, path or data line never shows a traceback.
"""


class UserError(Exception):
    """A mistake in what the user gave us (a config value, a file, a line)."""

    exit_code = 2
