"""The one exception type users see: a one-line message naming the problem and the fix."""


class ComeError(Exception):
    """Bad input or an impossible request. The CLI prints it as one line and exits 2."""
