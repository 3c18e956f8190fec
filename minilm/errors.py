"""The error types of input minilm cannot accept, and the command-line parser its scripts share.

- `InputError`: a model file, a field in it, or an argument of the library. It is a ValueError (and a TypeError,
  for arguments of the wrong type), so `except ValueError` catches it; its message names the file and field, or
  the argument, and says what would be accepted. `MissingFileError` is one for a file that is not there.
- `UsageError`: a problem with a script's flags, files or folders (train.py, eval.py, mine.py,
  recipes/split_pairs.py): one line for the user, exit status 2. `Parser` is argparse's parser raising it, instead
  of printing its usage and exiting; the flag types below (numbers in a range, a JSON object) are its
  checks of single values.

Some modules have an error type of their own, named for what they read: `DataError` (minilm/data.py, training and
evaluation data), `RunFolderError` (minilm/run_folder.py), `CorpusError` (minilm/corpus.py).
"""

import argparse
import contextlib
import json
import math
from pathlib import Path


class InputError(ValueError, TypeError):
    """A model file, a field in it, or an argument that minilm cannot accept."""


class MissingFileError(InputError, FileNotFoundError):
    """A file the model needs is not there (also a FileNotFoundError)."""


class UsageError(Exception):
    """A problem with the flags, the files or the folders: one line for the user, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse's own errors (a missing flag, a bad choice, a value its type refuses) as one UsageError line,
    without the usage block."""

    def error(self, message):
        raise UsageError(message)

    def values_from_json(self, path, flag: str, ignored=(), refused=()) -> dict:
        """The flag values of a JSON file (train.py's --recipe): read, then checked by parse_values; keys in
        `ignored` document the file and are left out. Errors name the flag, the file and the key (or line)."""
        try:
            values = json.loads(Path(path).read_text(encoding="utf-8-sig"))
        except OSError as error:
            raise UsageError(f"{flag} {path}: cannot read it ({error.strerror})") from None
        except UnicodeDecodeError:
            raise UsageError(f"{flag} {path}: not UTF-8 text, where a JSON file was expected") from None
        except json.JSONDecodeError as error:
            raise UsageError(f"{flag} {path}:{error.lineno}: not valid JSON ({error.msg})") from None
        if not isinstance(values, dict):
            raise UsageError(f"{flag} {path}: expected a JSON object of flag values, got {type(values).__name__}")
        return self.parse_values({key: value for key, value in values.items() if key not in ignored},
                                 f"{flag} {path}:", refused)

    def parse_values(self, values: dict, where: str, refused=()) -> dict:
        """Flag values read from a file (a recipe, a checkpoint's flags), {dest: value} -> {dest: parsed value}:
        each is given to its flag as on the command line (a list to a comma_list flag as "a,b"), so it passes
        the flag's own checks. A null value is left out (an on/off flag takes true or false only); a key that
        names no flag (or is in `refused`) is refused. Errors: one UsageError line f"{where} {key!r} ..."."""
        actions = {action.dest: action for action in self._actions if action.option_strings}
        known = sorted(set(actions) - {"help", *refused})
        parsed = {}
        for key, value in values.items():
            if key not in known:
                raise UsageError(f"{where} unknown key {key!r}; keys are flag names with _ for -: {', '.join(known)}")
            action, shown = actions[key], _json(value) or f"a {type(value).__name__}"
            flag = action.option_strings[0]
            if action.nargs == 0:  # on/off flags
                if not isinstance(value, bool):
                    raise UsageError(f"{where} {key!r} is {shown}, expected true or false")
                argv = [flag] if value else []
            elif value is None:
                continue
            elif action.nargs == "+":
                items = value if isinstance(value, list) else [value]
                if not items or not all(isinstance(item, str) for item in items):
                    raise UsageError(f"{where} {key!r} is {shown}, expected a string or a list of strings")
                argv = [flag, *items]
            elif isinstance(value, dict) and _json(value):
                argv = [flag, _json(value)]
            elif isinstance(value, (int, float)) and not isinstance(value, bool) and action.type is None:
                # a text flag (a path, a prompt, a name): a number there is a slip, never the text "3"
                raise UsageError(f"{where} {key!r} is {shown}, expected a string")
            elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
                argv = [flag, str(value)]
            elif isinstance(value, list) and getattr(action.type, "comma_separated", False):  # [384, 64]: "384,64"
                if not value or any(isinstance(item, (bool, list, dict)) or item is None for item in value):
                    raise UsageError(f"{where} {key!r} is {shown}, expected a list of numbers or a string \"1,2\"")
                argv = [flag, ",".join(map(str, value))]
            else:
                raise UsageError(f"{where} {key!r} is {shown}, expected a string or a number")
            try:
                parsed[key] = getattr(self.parse_args(argv), key)
            except UsageError as error:
                raise UsageError(f"{where} {key!r}: {error}") from None
        return parsed


@contextlib.contextmanager
def blamed_on(flag: str, *errors):
    """An error of the kinds `errors` raised inside becomes one UsageError line: its first line, after `flag` (the
    flag and value it comes from, e.g. "--device cuda:3"; "" for none)."""
    try:
        yield
    except errors as error:
        raise UsageError(f"{flag}: {first_line(error)}" if flag else first_line(error)) from None


def first_line(error: Exception) -> str:
    """An error's message for a one-line report: its first line, or its type's name when it has none."""
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _json(value):
    """value as JSON text, or None when JSON cannot hold it (a tensor, say)."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return None


def _number(kind, low=None, above=None, below=None, what=""):
    """A flag type: text -> a finite number of `kind` within the bounds, else argparse's error saying `what`."""
    def parse(text):
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if (kind is float and not math.isfinite(value)) or (low is not None and value < low) \
                or (above is not None and value <= above) or (below is not None and value >= below):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


positive_int = _number(int, low=1, what="a whole number >= 1")
non_negative_int = _number(int, low=0, what="a whole number >= 0")
positive_float = _number(float, above=0, what="a number > 0")
non_negative_float = _number(float, low=0, what="a number >= 0")
fraction = _number(float, low=0, below=1, what="a number in 0..1 (1 excluded)")
any_float = _number(float, what="a number")
seed = _number(int, low=0, below=2 ** 32, what="a whole number in 0..4294967295 (numpy's seeds)")


def comma_list(item):
    """A flag type: "384,256,64" -> [384, 256, 64], each item checked by `item` (one of the types above). A recipe
    may give the list itself (Parser.parse_values)."""
    def parse(text):
        try:
            return [item(part.strip()) for part in text.split(",")]
        except argparse.ArgumentTypeError as error:
            raise argparse.ArgumentTypeError(f"{error} in the comma-separated list {text!r}") from None
    parse.comma_separated = True
    return parse


def json_object(text):
    """A flag type: JSON text -> the dict it holds, else argparse's error."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f'expected a JSON object like \'{{"scale": 20}}\', got {text!r}')
    return value
