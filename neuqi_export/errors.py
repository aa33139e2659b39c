"""The one exception type that reaches the user as a one-line message."""


class UserError(Exception):
    """Bad input: the message names the problem and the fix; the CLI prints it and exits 2."""
