"""The one exception type for user mistakes: bad arguments, bad files, missing data."""

from hydra.errors import CompactHydraException


class UserError(CompactHydraException, ValueError):
    """A mistake in what the user gave us, with a message naming the value and what is accepted.

    It is a ``ValueError`` for library users; the command-line apps print its message alone (no
    traceback, exit code 1), which is how Hydra reports a ``CompactHydraException``.
    """


def check_positive_int(name: str, value: object) -> int:
    """Return ``value`` if it is an integer >= 1, else raise a `UserError` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name} must be a positive integer, got {value!r}")
    return value
