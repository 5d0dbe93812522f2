"""Errors that reach the user as one line and a non-zero exit.

Every class subclasses ``click.ClickException`` so the command-line entry points print the message
without a traceback, and the matching built-in where one fits so library callers can catch
``ValueError`` or ``FileNotFoundError`` as usual.
"""

import click


class HeadlensError(click.ClickException):
    """Base class of every error headlens reports to the user."""

    exit_code = 2


class BadInputError(HeadlensError, ValueError):
    """A command-line value or an argument is invalid."""


class StoreNotFoundError(HeadlensError, FileNotFoundError):
    """No headlens store exists at the given location."""


class StoreFormatError(HeadlensError, ValueError):
    """The location contains something that is not a readable headlens store of this format version."""


class StoreMismatchError(HeadlensError, ValueError):
    """A resumed run or a lens disagrees with the store on a setting."""


class StoreLockedError(HeadlensError, RuntimeError):
    """Another live process is writing the store."""


class StoreWriteError(HeadlensError, OSError):
    """Writing to the store failed, for example because the disk is full."""


class NumericsError(HeadlensError, ArithmeticError):
    """Activations contain NaN or inf, or overflow the chosen dtype."""


class ModelLoadError(HeadlensError, ValueError):
    """The model could not be found or loaded."""


class DatasetError(HeadlensError, ValueError):
    """The text source could not be read or contains too little text."""


class LensError(HeadlensError, ValueError):
    """A lens folder is missing, corrupt, or belongs to another model or layer."""
