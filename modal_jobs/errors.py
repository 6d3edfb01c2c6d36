"""The error type every stage raises for bad input: it fails fast and is never retried."""


class MoleError(Exception):
    """A user-facing failure whose message names the file, the line and the fix."""
