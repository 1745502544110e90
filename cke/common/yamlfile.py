"""Reading YAML whose errors never echo its content (a config file may hold passwords).

Shared by cke's, sabakan's and sabactl's config files and the cluster parser."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class YAMLFileError(ValueError):
    """The file cannot be read or parsed; the message holds no line of its content."""


def yaml_error_position(exc: yaml.YAMLError, text: str) -> str:
    """`` at line L, column C`` of a YAML error ("" when unknown), never its text."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if mark is not None:
        return f" at line {mark.line + 1}, column {mark.column + 1}"
    position = getattr(exc, "position", None)  # ReaderError: an unacceptable character
    if isinstance(position, int) and 0 <= position <= len(text):
        before = text[:position]
        line = before.count("\n") + 1
        column = position - (before.rfind("\n") + 1) + 1
        return f" (unacceptable character) at line {line}, column {column}"
    return ""


def yaml_error_message(exc: yaml.YAMLError, text: str) -> str:
    """``invalid YAML at line L, column C``: PyYAML's own text quotes the offending
    line and may name a token from it (``tag '!…'``), so neither is shown."""
    return f"invalid YAML{yaml_error_position(exc, text)}"


def load_yaml(path: str) -> Any:
    """The parsed file (None when empty); YAMLFileError names the file and, for a
    syntax error, only the line and column."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise YAMLFileError(f"{path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise YAMLFileError(f"{path}: not UTF-8 text") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        message = f"{path}: {yaml_error_message(exc, text)}"
    # raised outside the handler: nothing chained to it holds PyYAML's text
    raise YAMLFileError(message)
