"""Reading JSON files with errors that point at the file, line and column.

Python's JSON reader keeps no positions once a document is parsed, and it silently keeps
the last of two equal keys. :func:`read_json_file` reports syntax errors as
``file:line:col``, refuses repeated keys (naming the line where it can) and raises the
caller's :class:`~dinov2_hier.errors.LocatedError` subclass, so a hierarchy and a label
map report their files the same way. :func:`find_json_lines` finds the line of a
``"key": value`` pair in the raw text, for errors found after parsing.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .errors import LocatedError

__all__ = ["find_json_lines", "read_json_file"]


def _json_literal_pattern(value: Any) -> str | None:
    """Regex matching ``value`` as it may be written in a JSON file (escaped or raw unicode)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        forms = {json.dumps(value), json.dumps(value, ensure_ascii=False)}
        return "(?:" + "|".join(re.escape(f) for f in sorted(forms)) + ")"
    return None


def find_json_lines(text: str | None, key: str, value: Any = ...) -> list[int]:
    """1-based line numbers where ``"key": value`` (or just ``"key":`` if no value) occurs.

    A plain text search, not a parse: JSON's standard library parser keeps no
    positions, and for error messages the textual occurrence is what a user needs.
    Returns ``[]`` when ``text`` is None or nothing matches.
    """
    if text is None:
        return []
    key_pattern = _json_literal_pattern(key)
    if key_pattern is None:
        return []
    pattern = key_pattern + r"\s*:"
    if value is not ...:
        value_pattern = _json_literal_pattern(value)
        if value_pattern is None:
            return []
        # The lookahead stops "id": 5 from matching "id": 55 or 5.5.
        pattern += r"\s*" + value_pattern + r"(?![0-9A-Za-z_.])"
    return [text.count("\n", 0, m.start()) + 1 for m in re.finditer(pattern, text)]


class _DuplicateJsonKey(Exception):
    """Raised from the JSON object hook; converted to a located error by read_json_file."""

    def __init__(self, key: str, pairs: list[tuple[str, Any]]) -> None:
        super().__init__(key)
        self.key = key
        self.pairs = pairs


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads silently keeps the last of two equal keys; a repeated "children"
    # would then drop a whole subtree without a word.
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise _DuplicateJsonKey(key, pairs)
        seen.add(key)
    return dict(pairs)


def read_json_file(
    path: str | Path, error_cls: type[LocatedError] = LocatedError, *, depth_note: str = ""
) -> tuple[Any, str]:
    """Read and parse a JSON file; return ``(data, raw_text)``.

    Errors (unreadable file, invalid UTF-8, JSON syntax with ``file:line:col``,
    a key repeated inside one object, nesting too deep for Python's reader) are raised
    as ``error_cls`` with the file name; ``depth_note`` is appended to the last one's
    message (e.g. the deepest tree a format allows).
    """
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise error_cls(f"file is not valid UTF-8 ({exc.reason} at byte {exc.start})", source=source) from None
    except OSError as exc:
        raise error_cls(f"cannot read file: {exc.strerror or exc}", source=source) from None
    try:
        data = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise error_cls(f"invalid JSON: {exc.msg}", source=source, line=exc.lineno, column=exc.colno) from None
    except RecursionError:  # Python's reader recurses per nested object or list (~1000 in all)
        raise error_cls(f"JSON nested too deeply to read{depth_note}", source=source) from None
    except _DuplicateJsonKey as exc:
        where = ""
        node_id = dict(exc.pairs).get("id")
        lines = find_json_lines(text, "id", node_id) if isinstance(node_id, str) else []
        if isinstance(node_id, str):
            where = f" of node {node_id!r}"
        if not lines:
            key_lines = find_json_lines(text, exc.key)
            lines = key_lines[1:2]  # the second occurrence is the repeat
        raise error_cls(
            f"key {exc.key!r} appears twice in the same JSON object{where}; JSON keeps only the last one",
            source=source,
            line=lines[0] if lines else None,
        ) from None
    return data, text
