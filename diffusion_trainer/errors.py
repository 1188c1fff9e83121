"""Errors a user can fix: shown as one clear message, without a traceback."""


class InputError(ValueError):
    """A bad model, dataset or path, named with what is wrong and what is allowed."""
