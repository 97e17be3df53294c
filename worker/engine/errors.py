"""Errors the engine reports to users: bad input they can fix, as opposed to bugs."""


class InputError(ValueError):
    """The request cannot be served as given (bad SOURCE, path outside the root, bad data, bad budget)."""


class Cancelled(RuntimeError):
    """The caller asked the pipeline to stop; raised at the next step boundary."""
