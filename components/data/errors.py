"""`DataError`: the one exception the data loaders raise for malformed input."""

from pathlib import Path
from typing import Optional, Union


class DataError(ValueError):
    """Malformed input: the message names the file, the record (index or id) and what is wrong.

    Attributes ``file``, ``record`` and ``reason`` hold the three parts for callers that want them.
    """

    def __init__(
        self,
        reason: str,
        *,
        file: Optional[Union[str, Path]] = None,
        record: Optional[Union[int, str]] = None,
    ):
        self.file = None if file is None else str(file)
        self.record = record
        self.reason = reason
        where = []
        if self.file is not None:
            where.append(self.file)
        if record is not None:
            where.append(f"record {record}" if isinstance(record, int) else str(record))
        super().__init__(f"{': '.join(where)}: {reason}" if where else reason)
