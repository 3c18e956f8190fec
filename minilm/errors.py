"""The one exception type for input minilm cannot accept: a model file, a field in it, or an argument.

`InputError` is a ValueError (and a TypeError, for arguments of the wrong type), so `except ValueError` catches it;
its message names the file and field, or the argument, and says what would be accepted.
"""


class InputError(ValueError, TypeError):
    """A model file, a field in it, or an argument that minilm cannot accept."""


class MissingFileError(InputError, FileNotFoundError):
    """A file the model needs is not there (also a FileNotFoundError)."""
