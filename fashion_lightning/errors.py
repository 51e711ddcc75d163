"""The one exception type for user mistakes, and the checks the library shares."""


class UserError(ValueError):
    """A mistake in what the user gave us, with a message naming the value and what is accepted.

    A plain ``ValueError`` for library users; the command-line apps print its message alone, as one ``error:`` line
    (`fashion_lightning.app.reported_as_one_line`).
    """


def check_positive_int(name: str, value: object) -> int:
    """Return ``value`` if it is an integer >= 1, else raise a `UserError` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name} must be a positive integer, got {value!r}")
    return value


def is_seed(value: object) -> bool:
    """Whether ``value`` is a seed Lightning's ``seed_everything`` takes: an integer in 0..2**32 - 1."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**32

