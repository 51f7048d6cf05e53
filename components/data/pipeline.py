"""The data pipeline at scale: rows as Arrow on disk, processed once, cached by their inputs.

:func:`cached_mixture` builds what :func:`~components.data.mixture.medical_meadow_mixture`
builds (same rows, same order, same tokens and labels) without holding the mix in Python:

1. **Load.** Local set files (JSON arrays or JSON Lines) are streamed record by record, checked
   (:func:`~components.data.instruct.check_instruction_record`) and written to Arrow files in
   batches; a file the streaming reader cannot read is handed to the whole-file reader
   (:func:`~components.data.json_records.read_json_records`), so malformed input fails with the
   same :class:`~components.data.errors.DataError` as everywhere else. Hub sets come from
   ``datasets.load_dataset`` (already Arrow) and are checked in batches. Capped sets are sampled
   as :func:`~components.data.instruct.take_amount` does; the sets are concatenated in order.
2. **Filter and split.** ``filter_fn``, then the study's holdout split
   (:func:`~components.data.instruct.holdout_split`: an index permutation over the same rows in
   the same order, so the same train rows as without the cache).
3. **Process**, in one batched ``datasets.map`` (``num_proc`` workers): decontamination
   (:class:`~components.data.decontaminate.Decontaminator`, 13-word n-grams), then the template
   and the tokenizer, through the very transform :class:`~components.data.instruct.InstructDataset`
   applies per item. Every record that is not kept gets a reason: ``contaminated``, ``empty``
   (no output text; only with ``skip_empty``) or ``too_long`` (more than ``max_seq_len``
   tokens; only with ``long_records="skip"``, otherwise truncated and counted, as the study did).
4. **Write.** That map writes the kept rows (text, ``tokens``, ``mask``, ``truncated``)
   straight into the cache's Arrow files (one per worker, listed in ``dataset/files.json``);
   the records it drops are logged per worker and counted into the report. Everything is built
   in a temporary folder, ``report.json`` is written last, and the folder is then renamed to
   its key: a build killed at any point leaves no folder that looks complete (temporary
   folders of dead builds are removed by the next build). A build holds a lock on its key
   (:func:`~components.data.cache_store.build_once`): other processes after the same cache, such as the other ranks of a
   distributed run, wait and then reuse it instead of building it again.

The key is a SHA-256 of every input: each set file's path, size and modification time (or a Hub
set's ``datasets`` fingerprint), the evaluation files' likewise, the tokenizer (its vocabulary
and special tokens), ``max_seq_len``, template, ``train_on_input``, system prompt, mixing,
split, decontamination and skip settings, ``filter_fn`` (hashed as ``datasets`` hashes map
functions), and the pipeline's code (the source of the modules it runs, and the versions of
torchtune and datasets). The next run with the same key memory-maps the cached Arrow files and
does no loading, checking, tokenizing or decontaminating. Caches live under
``$MEDTUNE_CACHE_DIR/data`` (else ``$XDG_CACHE_HOME/medtune/data``, else
``~/.cache/medtune/data``), or ``cache_dir``; they can be deleted at any time.
"""

import codecs
import copy
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
from torchtune.data._utils import truncate
from torchtune.data._messages import validate_messages
from torchtune.datasets._sft import SFTTransform
from torchtune.modules.transforms.tokenizers import ModelTokenizer
from torchtune.utils import get_logger

from components.data.cache_store import build_once, cache_key, data_cache_root, folder_bytes, mark_used, write_report
from components.data.decontaminate import Decontaminator
from components.data.errors import DataError
from components.data.instruct import (
    HOLDOUT_PARTS,
    InstructDataset,
    _slice,
    check_instruction_record,
    check_loaded_rows,
    holdout_split,
    summary,
    take_amount,
)
from components.data.json_records import DECODER, has_lone_surrogate, read_json_records
from components.data.templates import (
    FIELDS,
    InstructToMessages,
    PlainTextTokenizer,
    check_template,
    model_transform_for,
)

log = get_logger("INFO")

#: Bump when the pipeline's output changes in a way the code hash would not catch.
PIPELINE_VERSION = "1"
#: Modules whose source is part of every key: a change to any of them rebuilds.
#: (json_records.py is not among them: valid files are read by this module's streaming reader,
#: and the whole-file reader is only asked to name what is wrong with a malformed one.)
CODE_MODULES = ("pipeline.py", "instruct.py", "templates.py", "decontaminate.py", "mixture.py")
LONG_RECORDS = ("truncate", "skip")
SKIP_REASONS = ("contaminated", "empty", "too_long")
TEXT_FEATURES = datasets.Features({f: datasets.Value("string") for f in FIELDS})
TOKEN_COLUMNS = ("tokens", "mask")
WRITE_BATCH = 10_000
FILES_LIST = "files.json"
MAX_EXAMPLES = 3
#: Below this many rows the map runs in the calling process (workers cost more than they save).
PARALLEL_MIN_ROWS = 50_000

#: Counters for tests and logs: builds done, cache hits, and records run through
#: :class:`RecordProcessor` in this process (records processed in ``num_proc`` workers are not
#: counted here).
STATS = {"builds": 0, "hits": 0, "rows_processed": 0}


# --- where and under what key -----------------------------------------------------------------

def path_fingerprint(path: Union[str, Path]) -> List[Tuple[str, int, int]]:
    """``[(absolute path, size, mtime_ns)]`` of a file, or of every file under a folder."""
    path = Path(path).resolve()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    elif path.is_file():
        files = [path]
    else:
        raise DataError("no such file or folder", file=path)
    out = []
    for f in files:
        st = f.stat()
        out.append((str(f), st.st_size, st.st_mtime_ns))
    return out


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what decides the tokenizer's output: its class, vocabulary (BPE ranks or the
    SentencePiece model), special tokens and ids, ``max_seq_len`` and prompt template."""
    h = hashlib.sha256(f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}".encode())
    inner = getattr(tokenizer, "tt_model", None) or getattr(tokenizer, "spm_model", None)
    encoding = getattr(inner, "tt_model", None)
    spm = getattr(inner, "spm_model", None)
    if encoding is not None and hasattr(encoding, "_mergeable_ranks"):
        for token, rank in encoding._mergeable_ranks.items():
            h.update(len(token).to_bytes(4, "little") + token + rank.to_bytes(8, "little"))
        h.update(encoding._pat_str.encode())
        h.update(json.dumps(sorted(encoding._special_tokens.items())).encode())
    elif spm is not None and hasattr(spm, "serialized_model_proto"):
        h.update(spm.serialized_model_proto())
    else:
        h.update(datasets.fingerprint.Hasher.hash(tokenizer).encode())
    for attr in ("bos_id", "eos_id", "pad_id", "special_tokens", "max_seq_len"):
        value = getattr(tokenizer, attr, None)
        h.update(f"{attr}={json.dumps(value, sort_keys=True, default=str)};".encode())
    template = getattr(tokenizer, "prompt_template", None)
    if template is not None:
        h.update(datasets.fingerprint.Hasher.hash(template).encode())
    return h.hexdigest()


def code_fingerprint() -> str:
    """A hash of the pipeline's code: its modules' source and the libraries' versions."""
    import torchtune

    h = hashlib.sha256(f"v{PIPELINE_VERSION} torchtune {torchtune.__version__} datasets {datasets.__version__}".encode())
    here = Path(__file__).parent
    for name in CODE_MODULES:
        h.update(name.encode() + b"\0" + (here / name).read_bytes())
    return h.hexdigest()


# --- streaming local files into Arrow ---------------------------------------------------------

class _CannotStream(Exception):
    """The streaming reader gives up; the whole-file reader decides (and names the error)."""


_WS = re.compile(r"[ \t\n\r]*")


def _iter_json_array(path: Path, chunk: int = 1 << 23) -> Iterator[Any]:
    """Elements of a JSON array file, parsed one at a time from ``chunk``-byte reads."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")("strict")
    with open(path, "rb") as f:
        buf, pos, eof = "", 0, False

        def more() -> None:
            nonlocal buf, pos, eof
            data = f.read(chunk)
            eof = not data
            try:
                buf = buf[pos:] + decoder.decode(data, final=eof)
            except UnicodeDecodeError:
                raise _CannotStream from None
            pos = 0

        def skip_ws() -> None:
            nonlocal pos
            while True:
                pos = _WS.match(buf, pos).end()
                if pos < len(buf) or eof:
                    return
                more()

        more()
        skip_ws()
        if not buf.startswith("[", pos):
            raise _CannotStream
        pos += 1
        skip_ws()
        if buf.startswith("]", pos):
            return
        while True:
            try:
                item, end = DECODER.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if eof:
                    raise _CannotStream from None
                more()
                continue
            except (ValueError, RecursionError):  # a repeated key, or nested too deeply
                raise _CannotStream from None
            if not isinstance(item, dict) or (end == len(buf) and not eof):
                # a non-object element, or a value that may go on past this read
                if isinstance(item, dict):
                    more()
                    continue
                raise _CannotStream
            yield item
            pos = end
            skip_ws()
            if buf.startswith(",", pos):
                pos += 1
                skip_ws()
            elif buf.startswith("]", pos):
                pos += 1
                skip_ws()
                if pos < len(buf):
                    raise _CannotStream
                return
            else:
                raise _CannotStream


def _iter_json_lines(path: Path) -> Iterator[Any]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f):
            try:
                line = raw.decode("utf-8-sig" if number == 0 else "utf-8")
            except UnicodeDecodeError:
                raise _CannotStream from None
            if not line.strip():
                continue
            try:
                item = DECODER.decode(line)
            except (ValueError, RecursionError):  # not JSON, a repeated key, nested too deeply
                raise _CannotStream from None
            if not isinstance(item, dict):
                raise _CannotStream
            yield item


def iter_instruction_file(path: Union[str, Path]) -> Iterator[Dict[str, str]]:
    """Checked ``{instruction, input, output}`` records of one local JSON/JSONL file, streamed,
    decoded as :mod:`components.data.json_records` decodes them (its ``DECODER``: a repeated key
    is refused; a lone surrogate is refused).

    Raises:
        _CannotStream: the file is not plainly a JSON array or JSON Lines of objects (the caller
            falls back to the whole-file reader, which names the problem).
        DataError: a record with a missing or non-string field (file and record named).
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    records = _iter_json_array(path) if head.startswith(b"[") else _iter_json_lines(path)
    for index, record in enumerate(records):
        if has_lone_surrogate(record):
            raise _CannotStream
        yield check_instruction_record(record, index, path)


def write_instruction_file(path: Union[str, Path], out: Path) -> datasets.Dataset:
    """Stream a local set file into the Arrow file ``out`` and memory-map it."""
    from datasets.arrow_writer import ArrowWriter

    def write(records) -> int:
        writer = ArrowWriter(features=TEXT_FEATURES, path=str(out), writer_batch_size=WRITE_BATCH)
        n, batch = 0, {f: [] for f in FIELDS}
        try:
            for record in records:
                for f in FIELDS:
                    batch[f].append(record[f])
                n += 1
                if n % WRITE_BATCH == 0:
                    writer.write_batch(batch)
                    batch = {f: [] for f in FIELDS}
            if batch["instruction"]:
                writer.write_batch(batch)
            writer.finalize()
        finally:
            writer.close()
        return n

    try:
        n = write(iter_instruction_file(path))
    except (_CannotStream, DataError):
        # the whole-file reader gives the project's own error for any malformed file
        records = read_json_records(path)
        n = write(check_instruction_record(r, i, path) for i, r in enumerate(records))
    if n == 0:
        raise DataError("holds no records", file=path)
    return datasets.Dataset.from_file(str(out))


# --- the per-record work ----------------------------------------------------------------------

class _SplitLongRepetitions:
    """torchtune's ``TikTokenBaseTokenizer._split_long_repetitions`` with a fast path.

    The original walks the text in Python, one character at a time, to cut runs of more than
    ``max_consecutive_slice_len`` (25,000) whitespace or non-whitespace characters; a text no
    longer than that has no such run and comes back whole. That case is answered here without
    the walk (the same single piece), so the token ids are the same; longer texts go to the
    original. It was half the time of tokenizing a Medical Meadow record.
    """

    def __init__(self, original: Callable):
        self.original = original

    def __call__(self, s: str, max_consecutive_slice_len: int):
        if len(s) <= max_consecutive_slice_len:
            return iter((s,))
        return self.original(s, max_consecutive_slice_len)


def fast_tokenizer(tokenizer: ModelTokenizer) -> ModelTokenizer:
    """A shallow copy of ``tokenizer`` whose tiktoken model skips the per-character walk of
    :class:`_SplitLongRepetitions`; any other tokenizer is returned as it is."""
    inner = getattr(tokenizer, "tt_model", None)
    if inner is None or not callable(getattr(inner, "_split_long_repetitions", None)):
        return tokenizer
    if isinstance(inner.__dict__.get("_split_long_repetitions"), _SplitLongRepetitions):
        return tokenizer
    fast_inner = copy.copy(inner)
    fast_inner._split_long_repetitions = _SplitLongRepetitions(inner._split_long_repetitions)
    fast = copy.copy(tokenizer)
    fast.tt_model = fast_inner
    return fast


class RecordProcessor:
    """Decontaminate, template and tokenize a batch of records (a batched ``datasets.map``
    function, ``with_indices=True``, that drops the records it does not keep).

    Kept records come back with their text and ``tokens``, ``mask`` (True where the loss
    ignores the token: labels are ``-100`` there and the token elsewhere, as ``SFTTransform``
    makes them) and ``truncated`` (longer than ``max_seq_len`` tokens,
    cut as the study did). Each record not kept is appended to ``<skip_dir>/<pid>.jsonl`` as
    ``[position, reason, detail]`` (reasons: :data:`SKIP_REASONS`; for contamination the detail
    is ``[eval set, eval item, overlap]``), so the build can count and report it, whichever
    worker process saw it.
    """

    def __init__(
        self,
        tokenizer: ModelTokenizer,
        *,
        template: str,
        train_on_input: bool,
        system_prompt: Optional[str],
        decontaminator: Optional[Decontaminator],
        skip_empty: bool,
        long_records: str,
        skip_dir: Optional[Union[str, Path]] = None,
    ):
        tokenizer = fast_tokenizer(tokenizer)
        self.max_seq_len = getattr(tokenizer, "max_seq_len", None)
        self.eos_id = getattr(tokenizer, "eos_id", None)
        self.transform = SFTTransform(
            message_transform=InstructToMessages(template=template, train_on_input=train_on_input, system_prompt=system_prompt),
            model_transform=model_transform_for(template, tokenizer),
        )
        # plain-text templates: tokenize once without the limit, then truncate exactly as
        # PlainTextTokenizer does; chat: tokenize with the limit, and again without it only for
        # records that reach it (to tell "exactly max_seq_len" from "truncated")
        self.plain = isinstance(self.transform._model_transform, PlainTextTokenizer)
        self.unlimited = None
        if self.max_seq_len:
            unlimited = copy.copy(tokenizer)
            unlimited.max_seq_len = None
            self.unlimited = SFTTransform(
                message_transform=InstructToMessages(template=template, train_on_input=train_on_input, system_prompt=system_prompt),
                model_transform=model_transform_for(template, unlimited),
            )
        self.decontaminator = decontaminator
        self.skip_empty = skip_empty
        self.long_records = long_records
        self.skip_dir = None if skip_dir is None else str(skip_dir)

    def __call__(self, batch: Dict[str, List[Any]], indices: List[int]) -> Dict[str, List[Any]]:
        fields = [f for f in FIELDS if f in batch]
        out: Dict[str, List[Any]] = {f: [] for f in fields}
        out.update(tokens=[], mask=[], truncated=[])
        skipped = []
        for position, values in zip(indices, zip(*(batch[f] for f in fields))):
            record = dict(zip(fields, values))
            reason, detail, tokens, mask, truncated = self.process(record)
            if reason:
                skipped.append([position, reason, detail])
                continue
            for f, value in zip(fields, values):
                out[f].append(value)
            out["tokens"].append(tokens)
            out["mask"].append(mask)
            out["truncated"].append(truncated)
        if skipped:
            if self.skip_dir is None:
                raise RuntimeError("records to skip but no skip_dir to record them in")
            with open(os.path.join(self.skip_dir, f"{os.getpid()}.jsonl"), "a", encoding="utf-8") as f:
                f.write("".join(json.dumps(row) + "\n" for row in skipped))
        return out

    def process(self, record: Dict[str, Any]) -> Tuple[str, Any, List[int], List[int], bool]:
        STATS["rows_processed"] += 1
        if self.decontaminator is not None:
            hit = self.decontaminator.match(record)
            if hit is not None:
                name, item, overlap = hit
                return "contaminated", [name, item, overlap], [], [], False
        if self.skip_empty and not (record.get("output") or "").strip():
            return "empty", "", [], [], False
        if self.plain and self.unlimited is not None:
            messages = self.unlimited._message_transform(record)["messages"]
            validate_messages(messages)
            tokens, mask = self.unlimited._model_transform.tokenize_messages(messages)
            full = len(tokens)
            truncated = full > self.max_seq_len
            if truncated:
                if self.long_records == "skip":
                    return "too_long", str(full), [], [], True
                # PlainTextTokenizer.tokenize_messages(add_end_tokens=True) with max_seq_len
                tokens = truncate(tokens, self.max_seq_len, self.eos_id)
                mask = truncate(mask, self.max_seq_len, False)
            return "", "", tokens, [bool(m) for m in mask], truncated
        sample = self.transform(record)
        tokens = sample["tokens"]
        mask = [bool(m) for m in sample["mask"]]
        truncated = False
        if self.unlimited is not None and len(tokens) >= self.max_seq_len:
            full = len(self.unlimited(record)["tokens"])
            truncated = full > self.max_seq_len
            if truncated and self.long_records == "skip":
                return "too_long", str(full), [], [], True
        return "", "", tokens, mask, truncated


# --- the dataset over a cache -----------------------------------------------------------------

class CachedInstructDataset(InstructDataset):
    """An ``SFTDataset`` whose items are read from memory-mapped Arrow files: ``__getitem__``
    returns the cached ``tokens`` and ``mask``, and ``labels`` made from them as ``SFTTransform``
    makes them (``-100`` where masked): what the lazy path computes per item.
    ``_data`` keeps the text columns too, for inspection; ``report`` tells what was built."""

    def __init__(self, data: datasets.Dataset, *, report: Dict[str, Any], cache_dir: Optional[Path] = None):
        self._data = data
        self._token_data = data.select_columns(list(TOKEN_COLUMNS))
        self.report = report
        self.cache_dir = cache_dir

    def __getitem__(self, index: int) -> Dict[str, Any]:
        row = self._token_data[index]
        tokens, mask = row["tokens"], row["mask"]
        return {
            "tokens": tokens,
            "mask": mask,
            "labels": [CROSS_ENTROPY_IGNORE_IDX if m else t for t, m in zip(tokens, mask)],
        }


# --- build or reuse ---------------------------------------------------------------------------

def open_dataset(folder: Path) -> datasets.Dataset:
    """The Arrow files listed in ``folder/files.json``, memory-mapped, in order."""
    names = json.loads((folder / FILES_LIST).read_text())
    parts = [datasets.Dataset.from_file(str(folder / name)) for name in names]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def load_cache(folder: Path) -> Optional[CachedInstructDataset]:
    """The dataset in a complete cache folder, or None when there is none."""
    report_file = folder / "report.json"
    if not report_file.is_file():
        return None
    report = json.loads(report_file.read_text())
    data = open_dataset(folder / "dataset")
    mark_used(folder)
    report["cache"] = {"hit": True, "dir": str(folder), "key": report["cache"]["key"], "bytes": report["cache"]["bytes"]}
    return CachedInstructDataset(data, report=report, cache_dir=folder)


def _default_num_proc(rows: int) -> int:
    if rows < PARALLEL_MIN_ROWS:
        return 1
    return max(1, min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


SetSource = Tuple[str, Any]  # ("file", path) or ("hub", datasets.Dataset already loaded)


def cached_mixture(
    tokenizer: ModelTokenizer,
    *,
    sets: Sequence[Tuple[str, Any]],
    sources: Mapping[str, SetSource],
    report: Dict[str, Any],
    mix_seed: int,
    split: str,
    template: str,
    train_on_input: bool,
    system_prompt: Optional[str],
    holdout_fraction: Optional[float],
    holdout_seed: int,
    holdout: str,
    decontaminate: Optional[Mapping[str, str]],
    decontaminate_ngram: int,
    filter_fn: Optional[Callable],
    skip_empty: bool = False,
    long_records: str = "truncate",
    cache_dir: Optional[Union[str, Path]] = None,
    num_proc: Optional[int] = None,
    load_dataset_kwargs: Optional[Mapping[str, Any]] = None,
) -> CachedInstructDataset:
    """Build (or reuse) the processed mixture; see the module docs.

    Args:
        sets: ``[(set name, amount)]`` as :func:`~components.data.mixture.parse_sets` gives.
        sources: set name -> ``("file", path)`` for a local file, or ``("hub", dataset)`` for a
            set already loaded with ``datasets.load_dataset`` (not yet checked).
        report: the report to fill (name and source already in it).
        skip_empty: drop records whose output is empty or blank (counted as ``empty``).
        long_records: ``"truncate"`` (the study's way; counted as ``truncated``) or ``"skip"``
            (counted as ``too_long``) for records over ``tokenizer.max_seq_len`` tokens.
        cache_dir: the cache's root folder; default :func:`~components.data.cache_store.data_cache_root`.
        num_proc: processes for the tokenizing map; default 2 (1 below 50,000 rows).
        Other arguments: as in :func:`components.data.mixture.medical_meadow_mixture`.
    """
    check_template(template)
    if long_records not in LONG_RECORDS:
        raise ValueError(f"long_records must be one of {LONG_RECORDS}, got {long_records!r}")
    if holdout_fraction is not None:
        if holdout not in HOLDOUT_PARTS:
            raise ValueError(f"holdout must be one of {HOLDOUT_PARTS}, got {holdout!r}")
        if not 0 < holdout_fraction < 1:
            raise ValueError(f"holdout_fraction must be between 0 and 1, got {holdout_fraction}")
    started = time.time()
    inputs = {}
    for name, _ in sets:
        kind, source = sources[name]
        inputs[name] = path_fingerprint(source) if kind == "file" else ["hub", source._fingerprint, len(source)]
    settings = {
        "pipeline": PIPELINE_VERSION,
        "code": code_fingerprint(),
        "sets": [[name, amount, inputs[name]] for name, amount in sets],
        "mix_seed": mix_seed,
        "split": split,
        "load_dataset_kwargs": sorted((k, str(v)) for k, v in (load_dataset_kwargs or {}).items()),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_seq_len": getattr(tokenizer, "max_seq_len", None),
        "template": template,
        "train_on_input": train_on_input,
        "system_prompt": system_prompt,
        "filter_fn": None if filter_fn is None else datasets.fingerprint.Hasher.hash(filter_fn),
        "holdout": None if holdout_fraction is None else [holdout_fraction, holdout_seed, holdout],
        "decontaminate": None if not decontaminate else {
            "ngram": decontaminate_ngram,
            "eval_sets": {name: path_fingerprint(path) for name, path in sorted(decontaminate.items())},
        },
        "skip_empty": skip_empty,
        "long_records": long_records,
    }
    key = cache_key(settings)
    root = data_cache_root(cache_dir)
    folder = root / f"{report.get('name', 'dataset')}-{key[:20]}"
    cached = load_cache(folder)
    if cached is not None:
        STATS["hits"] += 1
        log.info(
            f"{cached.report.get('name', 'dataset')}: cache hit {folder} "
            f"({len(cached):,} rows, {time.time() - started:.1f} s): {summary(cached.report)}"
        )
        return cached

    def build(tmp: Path) -> None:
        _build(
            tokenizer, tmp, sets=sets, sources=sources, report=report, mix_seed=mix_seed, split=split,
            template=template, train_on_input=train_on_input, system_prompt=system_prompt,
            holdout_fraction=holdout_fraction, holdout_seed=holdout_seed, holdout=holdout,
            decontaminate=decontaminate, decontaminate_ngram=decontaminate_ngram, filter_fn=filter_fn,
            skip_empty=skip_empty, long_records=long_records, num_proc=num_proc,
        )
        report["build_seconds"] = round(time.time() - started, 1)
        report["cache"] = {"key": key, "bytes": folder_bytes(tmp / "dataset")}
        (tmp / "settings.json").write_text(json.dumps(settings, indent=1, default=str))
        write_report(tmp, report)

    if not build_once(root, key, folder, build):  # another process built it while this one waited
        cached = load_cache(folder)
        STATS["hits"] += 1
        log.info(f"{cached.report.get('name', 'dataset')}: cache hit {folder}, built by another process")
        return cached
    STATS["builds"] += 1
    ds = load_cache(folder)
    ds.report["cache"]["hit"] = False
    log.info(
        f"{report.get('name', 'dataset')}: built {folder} in {report['build_seconds']:.0f} s: "
        f"{summary(ds.report)}; skipped {ds.report['skipped']}, truncated {ds.report['truncated']}"
    )
    return ds


def _build(
    tokenizer: ModelTokenizer,
    tmp: Path,
    *,
    sets, sources, report, mix_seed, split, template, train_on_input, system_prompt, holdout_fraction,
    holdout_seed, holdout, decontaminate, decontaminate_ngram, filter_fn, skip_empty, long_records, num_proc,
) -> datasets.Dataset:
    from components.data.medical_meadow import MEDICAL_MEADOW_SETS

    (tmp / "raw").mkdir()
    parts, per_set = [], {}
    for name, amount in sets:
        kind, source = sources[name]
        if kind == "file":
            data = _slice(write_instruction_file(source, tmp / "raw" / f"{name}.arrow"), split, source)
        else:
            data = check_loaded_rows(source, f"{report.get('source', 'hub')} {name}")
        available = len(data)
        data = take_amount(data, amount, mix_seed)
        per_set[name] = {"available": available, "taken": len(data), "study": MEDICAL_MEADOW_SETS.get(name)}
        if "input" not in data.column_names:
            data = data.add_column("input", [""] * len(data))
        data = data.select_columns(list(FIELDS))
        if data.features != TEXT_FEATURES:
            data = data.cast(TEXT_FEATURES)
        parts.append(data)
    if not parts:
        raise ValueError("the mixture has no sets")
    report["sets"] = per_set
    report["mix_seed"] = mix_seed
    data = datasets.concatenate_datasets(parts)
    report["rows"] = len(data)
    if filter_fn is not None:
        data = data.filter(filter_fn, cache_file_name=str(tmp / "filtered.arrow"))
        report["after_filter"] = len(data)
    if holdout_fraction is not None:
        size = len(data)
        data = holdout_split(data, holdout_fraction, holdout_seed, holdout, indices_dir=tmp)
        report["holdout"] = {
            "fraction": holdout_fraction,
            "seed": holdout_seed,
            "part": holdout,
            "train": size - len(data) if holdout == "validation" else len(data),
            "validation": len(data) if holdout == "validation" else size - len(data),
        }
    checker = Decontaminator(decontaminate, ngram=decontaminate_ngram) if decontaminate else None
    skip_dir = tmp / "skipped"
    skip_dir.mkdir()
    out_dir = tmp / "dataset"
    out_dir.mkdir()
    processor = RecordProcessor(
        tokenizer, template=template, train_on_input=train_on_input, system_prompt=system_prompt,
        decontaminator=checker, skip_empty=skip_empty, long_records=long_records, skip_dir=skip_dir,
    )
    procs = num_proc or _default_num_proc(len(data))
    features = datasets.Features({
        **TEXT_FEATURES,
        "tokens": datasets.Sequence(datasets.Value("int32")),
        "mask": datasets.Sequence(datasets.Value("bool")),
        "truncated": datasets.Value("bool"),
    })
    final = data.map(
        processor,
        batched=True,
        batch_size=1_000,
        with_indices=True,
        remove_columns=data.column_names,
        num_proc=procs if procs > 1 else None,
        features=features,
        new_fingerprint="medtune-process-" + hashlib.sha256(tmp.name.encode()).hexdigest()[:32],
        cache_file_name=str(out_dir / "data.arrow"),
        desc="decontaminate, template, tokenize",
    )
    files = [Path(f["filename"]) for f in final.cache_files]
    if any(f.parent != out_dir for f in files):
        raise RuntimeError(f"datasets wrote the processed rows outside the build folder: {files}")
    (out_dir / FILES_LIST).write_text(json.dumps([f.name for f in files]))
    # what was not kept, from every worker's record of it
    skipped_rows: Dict[int, Tuple[str, Any]] = {}
    for log_file in sorted(skip_dir.glob("*.jsonl")):
        for line in log_file.read_text(encoding="utf-8").splitlines():
            position, reason, detail = json.loads(line)
            skipped_rows[position] = (reason, detail)
    skipped = {reason: 0 for reason in SKIP_REASONS}
    removed_per_set = {name: 0 for name in (decontaminate or {})}
    examples: Dict[str, List[Dict[str, Any]]] = {name: [] for name in (decontaminate or {})}
    for position in sorted(skipped_rows):
        reason, detail = skipped_rows[position]
        skipped[reason] += 1
        if reason == "contaminated":
            name, item, overlap = detail
            removed_per_set[name] += 1
            if len(examples[name]) < MAX_EXAMPLES:
                examples[name].append({"index": position, "eval_item": item, "overlap": overlap})
    if len(final) + len(skipped_rows) != len(data):
        raise RuntimeError(f"{len(data)} records in, {len(final)} kept and {len(skipped_rows)} skipped")
    if checker is not None:
        report["decontamination"] = {
            "ngram": checker.ngram,
            "eval_sets": checker.sets,
            "checked": len(data),
            "removed": skipped["contaminated"],
            "removed_per_set": removed_per_set,
            "examples": examples,
        }
    report["skipped"] = skipped
    report["truncated"] = int(pa.compute.sum(final.data.column("truncated")).as_py() or 0)
    report["long_records"] = long_records
    report["max_seq_len"] = getattr(tokenizer, "max_seq_len", None)
    report["template"] = template
    report["train_on_input"] = train_on_input
    report["final"] = len(final)
    shutil.rmtree(tmp / "raw", ignore_errors=True)
    for f in tmp.glob("*.arrow"):
        f.unlink()
    return final
