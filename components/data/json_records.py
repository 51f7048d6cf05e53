"""Read a local JSON array or JSON Lines file of objects, failing with a `DataError` that names
the file and the record, instead of a decoder traceback."""

import json
import re
from pathlib import Path
from typing import Any, Dict, List, Union

from components.data.errors import DataError

_WHITESPACE = re.compile(r"\s*")
_DECODER = json.JSONDecoder()


def read_text(path: Union[str, Path]) -> str:
    """The file's text, decoded as strict UTF-8 (a BOM is allowed); empty files are an error."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError("no such file", file=path) from None
    except IsADirectoryError:
        raise DataError("is a directory, expected a file", file=path) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"not valid UTF-8: byte 0x{raw[e.start]:02x} at offset {e.start} (line {line})",
            file=path,
        ) from None
    if not text.strip():
        raise DataError("file is empty", file=path)
    return text


def _position(text: str, pos: int) -> str:
    line = text.count("\n", 0, pos) + 1
    return f"line {line} column {pos - (text.rfind(chr(10), 0, pos) + 1) + 1}"


def _parse_array(text: str, path: Path) -> List[Any]:
    """Parse a JSON array element by element, so a decode error names the record it is in."""
    items: List[Any] = []
    pos = _WHITESPACE.match(text, 0).end() + 1  # past '['
    pos = _WHITESPACE.match(text, pos).end()
    if text.startswith("]", pos):
        return items
    while True:
        try:
            item, pos = _DECODER.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            reason = "truncated" if e.pos >= len(text.rstrip()) else e.msg
            raise DataError(
                f"not valid JSON ({reason}) at {_position(text, e.pos)}",
                file=path,
                record=len(items),
            ) from None
        items.append(item)
        pos = _WHITESPACE.match(text, pos).end()
        if text.startswith(",", pos):
            pos = _WHITESPACE.match(text, pos + 1).end()
        elif text.startswith("]", pos):
            if text[pos + 1 :].strip():
                raise DataError(
                    f"unexpected data after the JSON array at {_position(text, pos + 1)}",
                    file=path,
                )
            return items
        else:
            what = "truncated: the array is not closed" if pos >= len(text) else (
                f"expected ',' or ']' at {_position(text, pos)}"
            )
            raise DataError(f"not valid JSON ({what})", file=path, record=len(items) - 1)


def _parse_lines(text: str, path: Path) -> List[Any]:
    items = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(
                f"not valid JSON on line {lineno} column {e.colno}: {e.msg}",
                file=path,
                record=len(items),
            ) from None
    return items


def read_json_records(path: Union[str, Path]) -> List[Dict[str, Any]]:
    """Objects from a JSON array file (``[{...}, ...]``) or a JSON Lines file (one per line).

    Raises:
        DataError: missing, empty, non-UTF-8 or truncated file, invalid JSON, or an element that
            is not an object; the message names the file and the record index.
    """
    path = Path(path)
    text = read_text(path)
    first = text.lstrip()[0]
    if first == "[":
        items = _parse_array(text, path)
    elif first == "{":
        items = _parse_lines(text, path)
    else:
        raise DataError(
            f"expected a JSON array or JSON Lines of objects, the file starts with {first!r}",
            file=path,
        )
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise DataError(
                f"expected a JSON object, got {type(item).__name__}", file=path, record=index
            )
    return items


def read_json(path: Union[str, Path]) -> Any:
    """A whole JSON document, with a `DataError` naming the file and position when invalid."""
    path = Path(path)
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        reason = "truncated" if e.pos >= len(text.rstrip()) else e.msg
        raise DataError(f"not valid JSON ({reason}) at {_position(text, e.pos)}", file=path) from None
