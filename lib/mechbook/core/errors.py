"""The one exception type the library raises for bad input: its message names the fix."""


class MechbookError(ValueError):
    """Bad input or an unusable environment; the message says what to do."""
