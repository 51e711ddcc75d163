"""The one exception type for user mistakes: bad arguments, bad files, missing data."""

import errno
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException, InstantiationException
from hydra.types import RunMode


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


def is_seed(value: object) -> bool:
    """Whether ``value`` is a seed Lightning's ``seed_everything`` takes: an integer in 0..2**32 - 1."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**32


DISK_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM}
PATH_ERRORS = {errno.EEXIST: "a file where a folder is needed", errno.ENOTDIR: "a file where a folder is needed",
               errno.EISDIR: "a folder where a file is needed"}


@contextmanager
def reported_as_one_line() -> Iterator[None]:
    """In a command-line app, print a `UserError` (raised directly or inside a Hydra instantiation) as one
    ``error: ...`` line on stderr and exit with code 1; a full or read-only disk, or a file where a folder should be
    (or the reverse), is reported the same way.
    In a multirun the error is re-raised instead, so the sweep records it and goes on with the next job.
    Any other exception (a bug) keeps its traceback.
    """
    try:
        try:
            yield
        except OSError as err:
            if err.errno in PATH_ERRORS:
                raise UserError(f"cannot use {err.filename or 'a path'}: {err.strerror} ({PATH_ERRORS[err.errno]}); "
                                "choose another path") from err
            if err.errno not in DISK_ERRORS:
                raise
            raise UserError(f"cannot use {err.filename or 'a file'}: {err.strerror} (a full or read-only disk, or no "
                            "permission?); free space, or choose paths you can write to") from err
    except (UserError, InstantiationException) as err:
        cause = err if isinstance(err, UserError) else err.__cause__
        in_sweep = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
        if not isinstance(cause, UserError) or in_sweep:
            raise
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(1)
