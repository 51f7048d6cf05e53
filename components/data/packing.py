"""Sample packing over the cache: torchtune's ``PackedDataset``, streamed to Arrow and memory-mapped.

torchtune's :class:`~torchtune.datasets.PackedDataset` builds every pack as tensors in RAM in its
``__init__`` (the study's mix at 256 tokens: about 575,000 packs, several GB) and does it again on
every run. :func:`cached_packs` packs the same way, pack for pack (greedy, in order; a row that
does not fit starts the next pack, or with ``split_across_pack`` is cut at ``max_seq_len``; a row
longer than ``max_seq_len`` without ``split_across_pack`` is a ``ValueError``; every pack padded to
``max_seq_len``: tokens with ``padding_idx``, labels with ``-100``, ``input_pos`` counting on from
its last value up to ``max_seq_len - 1``, the padding as a last entry of ``seq_lens``), but writes
the packs in batches to one Arrow IPC file (int32 columns), so memory does not grow with the
number of packs. :class:`CachedPackedDataset` memory-maps that file; its items are what
``PackedDataset`` returns (``tokens``, ``labels``, ``input_pos``, ``seq_lens``, int64 tensors), so
``padded_collate_packed`` and the recipes work unchanged. It is a ``PackedDataset`` subclass, so
``torchtune.datasets.ConcatDataset`` (a list of datasets in a config) sees it as packed.

The packs are cached as the rows are (:mod:`components.data.pipeline`): under the source cache's
folder, in ``packed/packs-<max_seq_len>-<key>``, the key a SHA-256 of the source cache's key,
``max_seq_len``, ``padding_idx``, ``split_across_pack``, this module's source and torchtune's
version. A build happens in a temporary folder next to it, ``report.json`` is written last and the
folder is renamed into place: a killed build leaves nothing that looks complete (its temporary
folder is removed by the next build); a second process after the same packs waits for the first
(:func:`~components.data.cache_store.build_once`). The next run memory-maps the packs without packing.
"""

import bisect
import hashlib
import json
import operator
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import numpy as np
import pyarrow as pa
import torch
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
from torchtune.datasets import PackedDataset
from torchtune.utils import get_logger

from components.data.cache_store import build_once, cache_key, folder_bytes, write_report

log = get_logger("INFO")

#: Bump when the packed files' layout changes.
PACKING_VERSION = "1"
PACKS_FILE = "packs.arrow"
REPORT = "report.json"
#: About this many tokens per written record batch (the only packs held in memory at a time).
BATCH_TOKENS = 1 << 20
#: Rows read from the source cache at a time.
ROW_BATCH = 10_000
KEYS = ("tokens", "labels", "input_pos", "seq_lens")
_INT32 = np.iinfo(np.int32)

#: Counters for tests and logs: pack builds done, cache hits, and rows packed in this process.
STATS = {"builds": 0, "hits": 0, "rows_packed": 0}


# --- packing: torchtune's algorithm, one pack at a time -------------------------------------------

class _Packer:
    """torchtune 0.6.1's ``PackedDataset._pack`` (``max_packs=None``), step for step, on numpy
    arrays, handing each finished (padded) pack to ``emit`` instead of keeping it."""

    def __init__(self, max_seq_len: int, padding_idx: int, split_across_pack: bool, emit):
        self.max_seq_len = max_seq_len
        self.padding_idx = padding_idx
        self.split_across_pack = split_across_pack
        self.emit = emit
        self.positions = np.arange(max_seq_len, dtype=np.int32)
        # the current pack: segments of (tokens, labels, input_pos), its length and seq_lens
        self.segments: List[Tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.length = 0
        self.seq_lens: List[int] = []
        self.previous_sample_boundary = 0

    def add(self, tokens: np.ndarray, labels: np.ndarray) -> None:
        L = self.max_seq_len
        seq_len = len(tokens)
        if seq_len > L and not self.split_across_pack:
            raise ValueError(
                f"Dataset sample is too long ({seq_len} > {L}). "
                "Please set `split_across_pack=True` or increase `max_seq_len`."
            )
        input_pos = self.positions[:seq_len] if seq_len <= L else np.arange(seq_len, dtype=np.int32) % L
        self.segments.append((tokens, labels, input_pos))
        self.length += seq_len
        self.seq_lens.append(seq_len)
        if self.length > L:
            tokens, labels, input_pos = self._current()
            while self.length > L:
                if self.split_across_pack:
                    boundary = L
                    leftover = L - sum(self.seq_lens[:-1])
                    seq_len_padding = [leftover] if leftover > 0 else []
                else:
                    boundary = self.previous_sample_boundary
                    seq_len_padding = []
                self._add_pack(tokens[:boundary], labels[:boundary], input_pos[:boundary],
                               self.seq_lens[:-1] + seq_len_padding)
                next_seq_len = self.length - boundary if self.split_across_pack else self.seq_lens[-1]
                tokens, labels, input_pos = tokens[boundary:], labels[boundary:], input_pos[boundary:]
                self.length = len(tokens)
                self.seq_lens = [next_seq_len]
            self.segments = [(tokens, labels, input_pos)]
        self.previous_sample_boundary = self.length

    def finish(self) -> None:
        if self.length > 0:
            self._add_pack(*self._current(), self.seq_lens)
        self.segments, self.length, self.seq_lens = [], 0, []

    def _current(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        if len(self.segments) == 1:
            return self.segments[0]
        return tuple(np.concatenate([s[k] for s in self.segments]) for k in range(3))

    def _add_pack(self, tokens, labels, input_pos, seq_lens: List[int]) -> None:
        """``PackedDataset._pad_pack``: pad to ``max_seq_len``, then hand the pack on."""
        L = self.max_seq_len
        n = len(tokens)
        num_padding = L - n
        if num_padding > 0:
            seq_lens = seq_lens + [num_padding]
        start = int(input_pos[-1]) + 1
        self.emit(tokens, labels, input_pos, start, seq_lens)


class _PackWriter:
    """Collects padded packs into int32 record batches and writes them to an Arrow IPC file."""

    def __init__(self, path: Path, max_seq_len: int, padding_idx: int):
        self.L = max_seq_len
        self.padding_idx = padding_idx
        self.batch = max(1, BATCH_TOKENS // max_seq_len)
        self.schema = pa.schema([
            ("tokens", pa.list_(pa.int32(), max_seq_len)),
            ("labels", pa.list_(pa.int32(), max_seq_len)),
            ("input_pos", pa.list_(pa.int32(), max_seq_len)),
            ("seq_lens", pa.list_(pa.int32())),
        ])
        self.sink = pa.OSFile(str(path), "wb")
        self.writer = pa.ipc.new_file(self.sink, self.schema)
        self.packs = 0
        self.tokens = 0  # tokens that are not padding
        self.max_pack_rows = 0
        self._new_batch()

    def _new_batch(self) -> None:
        self.n = 0
        self.tok = np.full((self.batch, self.L), self.padding_idx, dtype=np.int32)
        self.lab = np.full((self.batch, self.L), CROSS_ENTROPY_IGNORE_IDX, dtype=np.int32)
        self.pos = np.empty((self.batch, self.L), dtype=np.int32)
        self.seq_lens: List[int] = []
        self.offsets = [0]

    def add(self, tokens: np.ndarray, labels: np.ndarray, input_pos: np.ndarray, start: int, seq_lens: List[int]) -> None:
        i, k, L = self.n, len(tokens), self.L
        self.tok[i, :k] = tokens
        self.lab[i, :k] = labels
        self.pos[i, :k] = input_pos
        # padding positions count on from the last one, clamped to max_seq_len - 1
        np.clip(np.arange(start, start + L - k), 0, L - 1, out=self.pos[i, k:])
        self.seq_lens += seq_lens
        self.offsets.append(len(self.seq_lens))
        self.tokens += k
        self.n += 1
        if self.n == self.batch:
            self.flush()

    def flush(self) -> None:
        if self.n == 0:
            return
        n, L = self.n, self.L
        columns = [pa.FixedSizeListArray.from_arrays(pa.array(a[:n].reshape(-1)), L) for a in (self.tok, self.lab, self.pos)]
        columns.append(pa.ListArray.from_arrays(
            pa.array(self.offsets, pa.int32()), pa.array(self.seq_lens, pa.int32())
        ))
        self.writer.write_batch(pa.record_batch(columns, schema=self.schema))
        self.packs += n
        self._new_batch()

    def close(self) -> None:
        self.flush()
        self.writer.close()
        self.sink.close()

    def abort(self) -> None:
        try:
            self.writer.close()
        finally:
            self.sink.close()


def _int32(values: Any, what: str) -> np.ndarray:
    a = np.asarray(values, dtype=np.int64).reshape(-1)
    if a.size and (a.min() < _INT32.min or a.max() > _INT32.max):
        raise ValueError(f"{what} outside int32 cannot be packed into the cache")
    return a.astype(np.int32)


def iter_rows(ds: Any) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """``(tokens, labels)`` of every item of ``ds`` in order, as int32 arrays.

    A :class:`~components.data.pipeline.CachedInstructDataset` is read straight from its Arrow
    columns, in batches (labels made as its ``__getitem__`` makes them: ``-100`` where masked);
    any other dataset is iterated as ``PackedDataset`` iterates it (``for sample in ds``)."""
    from components.data.pipeline import CachedInstructDataset

    if isinstance(ds, CachedInstructDataset) and type(ds).__getitem__ is CachedInstructDataset.__getitem__:
        ignore = np.int32(CROSS_ENTROPY_IGNORE_IDX)
        for table in ds._token_data.with_format("arrow").iter(batch_size=ROW_BATCH):
            tokens = table.column("tokens").combine_chunks()
            mask = table.column("mask").combine_chunks()
            offsets = tokens.offsets.to_numpy()
            offsets = offsets - offsets[0]
            if not np.array_equal(offsets, mask.offsets.to_numpy() - mask.offsets.to_numpy()[0]):
                raise RuntimeError("the cache's tokens and mask differ in length")
            flat = tokens.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
            labels = np.where(mask.flatten().to_numpy(zero_copy_only=False), ignore, flat)
            for a, b in zip(offsets[:-1], offsets[1:]):
                yield flat[a:b], labels[a:b]
        return
    for sample in ds:
        yield _int32(sample["tokens"], "tokens"), _int32(sample["labels"], "labels")


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def write_packs(
    ds: Any,
    path: Path,
    *,
    max_seq_len: int,
    padding_idx: int = 0,
    split_across_pack: bool = False,
    rows: Optional[Iterable[Tuple[np.ndarray, np.ndarray]]] = None,
) -> Dict[str, int]:
    """Pack ``ds`` as ``PackedDataset(ds, max_seq_len=..., padding_idx=..., split_across_pack=...)``
    does and write the packs to the Arrow file ``path``; return counts (rows, packs, tokens)."""
    if max_seq_len is None or max_seq_len < 1:
        raise ValueError(f"max_seq_len must be a positive number of tokens, got {max_seq_len!r}")
    writer = _PackWriter(path, max_seq_len, padding_idx)
    packer = _Packer(max_seq_len, padding_idx, split_across_pack, writer.add)
    n_rows = 0
    try:
        from tqdm import tqdm

        total = len(ds) if hasattr(ds, "__len__") else None
        with tqdm(total=total, desc="Packing dataset", dynamic_ncols=True, disable=_rank() != 0) as bar:
            for tokens, labels in (iter_rows(ds) if rows is None else rows):
                packer.add(tokens, labels)
                n_rows += 1
                if n_rows % 10_000 == 0:
                    bar.update(10_000)
            bar.update(n_rows % 10_000)
        packer.finish()
        writer.close()
    except BaseException:
        writer.abort()
        raise
    STATS["rows_packed"] += n_rows
    return {"rows": n_rows, "packs": writer.packs, "tokens": writer.tokens}


# --- the dataset over the packed cache --------------------------------------------------------------

class CachedPackedDataset(PackedDataset):
    """The packs of :func:`cached_packs`, memory-mapped from ``folder/packs.arrow``.

    ``__getitem__`` returns what ``PackedDataset.__getitem__`` returns: ``tokens``, ``labels``,
    ``input_pos`` (each ``max_seq_len`` long) and ``seq_lens``, as int64 tensors. ``report`` is the
    source dataset's report plus ``report["packing"]`` (rows, packs, tokens, padding, the cache);
    ``ds`` is the source dataset. Nothing is packed or held in memory here (``__init__`` does not
    run ``PackedDataset``'s), and ``max_packs`` is always None."""

    def __init__(self, folder: Union[str, Path], *, ds: Any = None, report: Optional[Dict[str, Any]] = None):
        self.folder = Path(folder)
        info = json.loads((self.folder / REPORT).read_text())
        self.ds = ds
        self.max_seq_len = info["max_seq_len"]
        self.padding_idx = info["padding_idx"]
        self.split_across_pack = info["split_across_pack"]
        self.max_packs = None
        self._len = info["packs"]
        self.report = dict(report or {})
        self.report["packing"] = info
        self._batches = None

    def _open(self) -> None:
        reader = pa.ipc.open_file(pa.memory_map(str(self.folder / PACKS_FILE), "r"))
        L = self.max_seq_len
        starts, batches = [], []
        start = 0
        for i in range(reader.num_record_batches):
            b = reader.get_batch(i)
            starts.append(start)
            start += b.num_rows
            fixed = [b.column(k).flatten().to_numpy().reshape(-1, L) for k in range(3)]
            seq = b.column(3)
            batches.append((*fixed, seq.offsets.to_numpy(), seq.values.to_numpy()))
        if start != self._len:
            raise RuntimeError(f"{self.folder / PACKS_FILE} holds {start} packs, its report says {self._len}")
        self._starts, self._batches = starts, batches

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        idx = operator.index(idx)
        if idx < 0:
            idx += self._len
        if not 0 <= idx < self._len:
            raise IndexError("pack index out of range")
        if self._batches is None:
            self._open()
        b = bisect.bisect_right(self._starts, idx) - 1
        j = idx - self._starts[b]
        tokens, labels, input_pos, offsets, seq_lens = self._batches[b]
        return {
            "tokens": torch.from_numpy(tokens[j].astype(np.int64)),
            "labels": torch.from_numpy(labels[j].astype(np.int64)),
            "input_pos": torch.from_numpy(input_pos[j].astype(np.int64)),
            "seq_lens": torch.from_numpy(seq_lens[offsets[j] : offsets[j + 1]].astype(np.int64)),
        }

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["_batches"] = None  # memory-mapped views are reopened, not pickled
        state.pop("_starts", None)
        return state


# --- build or reuse ---------------------------------------------------------------------------------

def packing_key(source_key: str, *, max_seq_len: int, padding_idx: int, split_across_pack: bool) -> str:
    import torchtune


    return cache_key({
        "packing": PACKING_VERSION,
        "source": source_key,
        "max_seq_len": max_seq_len,
        "padding_idx": padding_idx,
        "split_across_pack": split_across_pack,
        "code": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
        "torchtune": torchtune.__version__,
    })


def _cache_hit(folder: Path, ds: Any, source_report: Optional[Dict[str, Any]], note: str) -> CachedPackedDataset:
    packed = CachedPackedDataset(folder, ds=ds, report=source_report)
    packed.report["packing"]["cache"]["hit"] = True
    STATS["hits"] += 1
    log.info(f"packed: cache hit {folder} ({len(packed):,} packs of {packed.report['packing']['max_seq_len']}, {note})")
    return packed


def cached_packs(
    ds: Any,
    *,
    max_seq_len: int,
    padding_idx: int = 0,
    split_across_pack: bool = False,
    cache_dir: Optional[Union[str, Path]] = None,
    source_key: Optional[str] = None,
) -> CachedPackedDataset:
    """Pack ``ds`` as ``PackedDataset(ds, max_seq_len=max_seq_len, padding_idx=padding_idx,
    split_across_pack=split_across_pack)`` would, into a cache folder; reuse it on the next run.

    Args:
        ds: a :class:`~components.data.pipeline.CachedInstructDataset` (read from its Arrow
            columns), or any dataset of ``{"tokens", "labels"}`` items with ``source_key`` and
            ``cache_dir`` given.
        cache_dir: where the packed folders live. Default: ``<ds.cache_dir>/packed``.
        source_key: what identifies the source's items. Default: ``ds.report["cache"]["key"]``.
    """

    if source_key is None:
        source_key = (getattr(ds, "report", None) or {}).get("cache", {}).get("key")
    if cache_dir is None and getattr(ds, "cache_dir", None) is not None:
        cache_dir = Path(ds.cache_dir) / "packed"
    if source_key is None or cache_dir is None:
        raise ValueError("cached_packs needs a cached source (report['cache']['key'] and cache_dir) or both given")
    started = time.time()
    key = packing_key(source_key, max_seq_len=max_seq_len, padding_idx=padding_idx, split_across_pack=split_across_pack)
    root = Path(cache_dir)
    folder = root / f"packs-{max_seq_len}-{key[:20]}"
    source_report = getattr(ds, "report", None)
    if (folder / REPORT).is_file():
        return _cache_hit(folder, ds, source_report, f"{time.time() - started:.1f} s")

    def build(tmp: Path) -> None:
        counts = write_packs(ds, tmp / PACKS_FILE, max_seq_len=max_seq_len, padding_idx=padding_idx,
                             split_across_pack=split_across_pack)
        positions = counts["packs"] * max_seq_len
        write_report(tmp, {
            **counts,
            "padding_tokens": positions - counts["tokens"],
            "fill": round(counts["tokens"] / positions, 4) if positions else None,
            "max_seq_len": max_seq_len,
            "padding_idx": padding_idx,
            "split_across_pack": split_across_pack,
            "build_seconds": round(time.time() - started, 1),
            "cache": {"key": key, "source_key": source_key, "dir": str(folder), "bytes": folder_bytes(tmp), "hit": False},
        })

    if not build_once(root, key, folder, build):  # another process packed it while this one waited
        return _cache_hit(folder, ds, source_report, "built by another process")
    STATS["builds"] += 1
    packed = CachedPackedDataset(folder, ds=ds, report=source_report)
    p = packed.report["packing"]
    fill = f"{p['fill']:.1%} tokens, the rest padding" if p["fill"] is not None else "nothing to pack"
    log.info(
        f"packed {p['rows']:,} rows into {p['packs']:,} packs of {max_seq_len} ({fill}) "
        f"in {p['build_seconds']:.0f} s: {folder}"
    )
    return packed
