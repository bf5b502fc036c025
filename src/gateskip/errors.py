"""One exception type for every user mistake, so the CLI can print it as one line."""


class GateSkipError(Exception):
    """A problem the user can fix (bad option, missing package, mismatched file)."""
