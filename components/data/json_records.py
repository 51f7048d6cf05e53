"""Read a local JSON array or JSON Lines file of objects, failing with a `DataError` that names
the file and the record, instead of a decoder traceback.

Beyond what ``json`` checks, a document is refused when an object repeats a key (``json`` keeps
the last value and drops the others silently), when a string holds a lone surrogate escape such
as ``"\\ud800"`` (not text: Arrow and UTF-8 writers fail on it later, far from the file), and
when it nests too deeply for the decoder.
"""

import json
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from components.data.errors import DataError

_WHITESPACE = re.compile(r"\s*")
#: A ``\\uD800``-``\\uDFFF`` escape: only then can a decoded string hold a lone surrogate.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


class _DuplicateKey(ValueError):
    """An object repeats a key; raised from the decoder's hook, turned into a `DataError`."""


def _unique_keys(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    record = dict(pairs)
    if len(record) != len(pairs):
        seen = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _DuplicateKey(f"duplicate key {key!r} in an object")
    return record


#: The decoder every reader here uses: ``json``'s, refusing a repeated key in an object (it raises
#: a ``ValueError``). Streaming readers that parse records themselves should decode with it too.
DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys)


def read_text(path: Union[str, Path]) -> str:
    """The file's text, decoded as strict UTF-8 (a BOM is allowed); empty files are an error."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError("no such file", file=path) from None
    except IsADirectoryError:
        raise DataError("is a directory, expected a file", file=path) from None
    except OSError as e:
        raise DataError(f"cannot read: {e.strerror or e}", file=path) from None
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


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _parse_array(text: str, path: Path, starts: Optional[List[int]] = None) -> List[Any]:
    """Parse a JSON array element by element, so a decode error names the record it is in and
    the line; ``starts`` (if given) receives the line each element starts on."""
    items: List[Any] = []
    pos = _WHITESPACE.match(text, 0).end() + 1  # past '['
    pos = _WHITESPACE.match(text, pos).end()
    if text.startswith("]", pos):
        return items
    while True:
        start = pos
        try:
            item, pos = DECODER.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            reason = "truncated" if e.pos >= len(text.rstrip()) else e.msg
            raise DataError(
                f"not valid JSON ({reason}) at {_position(text, e.pos)}",
                file=path,
                record=len(items),
            ) from None
        except (_DuplicateKey, RecursionError) as e:
            raise DataError(f"{_reason(e)} (the record starting on line {_line(text, start)})",
                            file=path, record=len(items)) from None
        items.append(item)
        if starts is not None:
            starts.append(_line(text, start))
        end = pos
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
                f"expected ',' or ']' at {_position(text, pos)}, after the record on lines "
                f"{_line(text, start)}-{_line(text, end - 1)}"
            )
            raise DataError(f"not valid JSON ({what})", file=path, record=len(items) - 1)


def _reason(error: Exception) -> str:
    """What a non-``JSONDecodeError`` failure of the decoder means, in words."""
    if isinstance(error, RecursionError):
        return "not valid JSON: nested too deeply to read"
    return f"not valid JSON: {error}"


def _parse_lines(text: str, path: Path, starts: Optional[List[int]] = None) -> List[Any]:
    """One JSON value per line. Lines end at ``\\n`` only: ``str.splitlines`` would also cut at
    U+2028, U+0085 and the like, which JSON strings may hold unescaped."""
    items = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            items.append(DECODER.decode(line))
            if starts is not None:
                starts.append(lineno)
        except json.JSONDecodeError as e:
            raise DataError(
                f"not valid JSON on line {lineno} column {e.colno}: {e.msg}",
                file=path,
                record=len(items),
            ) from None
        except (_DuplicateKey, RecursionError) as e:
            raise DataError(f"line {lineno}: {_reason(e)}", file=path, record=len(items)) from None
    return items


def has_lone_surrogate(value: Any) -> bool:
    """Whether a decoded JSON value holds a string (key or value) with an unpaired surrogate;
    iterative, so a deeply nested value cannot exhaust the stack."""
    stack = [value]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return False


def _check_surrogates(text: str, document: Any, path: Path) -> None:
    """Refuse a lone surrogate, naming the record (list index) or top-level key holding it."""
    if _SURROGATE_ESCAPE.search(text) is None:
        return
    if isinstance(document, list):
        parts = list(enumerate(document))
    elif isinstance(document, dict):
        parts = [(f"key {key!r:.60}", value) for key, value in document.items()]
    else:
        parts = [(None, document)]
    for record, value in parts:
        if has_lone_surrogate(value) or (isinstance(record, str) and has_lone_surrogate(record)):
            raise DataError(
                "a string holds a lone surrogate escape (\\ud800-\\udfff without its pair): not text",
                file=path,
                record=record,
            )


def read_json_records(path: Union[str, Path]) -> List[Dict[str, Any]]:
    """Objects from a JSON array file (``[{...}, ...]``) or a JSON Lines file (one per line).

    Raises:
        DataError: missing, empty, non-UTF-8 or truncated file, invalid JSON, or an element that
            is not an object; the message names the file and the record index.
    """
    path = Path(path)
    text = read_text(path)
    starts: List[int] = []
    items = _parse_array(text, path, starts) if text.lstrip()[0] == "[" else _parse_lines(text, path, starts)
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise DataError(
                f"expected a JSON object, got {type(item).__name__} (line {starts[index]})", file=path, record=index
            )
    _check_surrogates(text, items, path)
    return items


def read_json(path: Union[str, Path]) -> Any:
    """A whole JSON document, with a `DataError` naming the file and where it is invalid (and
    the refusals of the module docstring). An array is read element by element, so an error in
    it names the record."""
    path = Path(path)
    text = read_text(path)
    if text.lstrip()[0] == "[":
        value = _parse_array(text, path)
    else:
        try:
            value = DECODER.decode(text)
        except json.JSONDecodeError as e:
            reason = "truncated" if e.pos >= len(text.rstrip()) else e.msg
            raise DataError(f"not valid JSON ({reason}) at {_position(text, e.pos)}", file=path) from None
        except (_DuplicateKey, RecursionError) as e:
            raise DataError(_reason(e), file=path) from None
    _check_surrogates(text, value, path)
    return value
