"""Errors a user can fix: shown as one clear message, without a traceback."""


class InputError(ValueError):
    """A bad model, dataset or path, named with what is wrong and what is allowed."""


class Stopped(Exception):
    """A stop (Ctrl-C, SIGTERM, the Lab's Stop) asked before training began: nothing to save."""


def raise_if_stopped(stop_asked, where: str) -> None:
    """For the long work before the first step (data check, caching, loading): a stop ends it there."""
    if stop_asked():
        raise Stopped(f"Stopped {where}, before training began: nothing was trained or saved.")
