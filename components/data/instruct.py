"""Loading, checking and building instruction datasets ``{instruction, input, output}``.

Every builder in this package goes through :func:`build_instruct_dataset`: records are loaded
and checked up front (malformed input raises :class:`~components.data.errors.DataError` naming
the file and record), then filtered, split, decontaminated, templated and tokenized. What
happened to the rows is kept in the dataset's ``report`` and logged.
"""

import random
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import datasets
from torchtune.datasets import PackedDataset, SFTDataset
from torchtune.datasets._sft import SFTTransform
from torchtune.modules.transforms import Transform
from torchtune.modules.transforms.tokenizers import ModelTokenizer
from torchtune.utils import get_logger

from components.data.decontaminate import Decontaminator
from components.data.errors import DataError
from components.data.json_records import read_json_records
from components.data.templates import FIELDS, InstructToMessages, model_transform_for

log = get_logger("INFO")

HOLDOUT_PARTS = ("train", "validation")


class InstructDataset(SFTDataset):
    """An :class:`~torchtune.datasets.SFTDataset` over rows that are already loaded and checked.

    ``SFTDataset`` loads its rows itself; here loading is done (and checked) by the builders, so
    only the per-sample transform is shared. ``report`` says where the rows came from and what
    was filtered, split off or removed.
    """

    def __init__(
        self,
        data: datasets.Dataset,
        *,
        message_transform: Transform,
        model_transform: Transform,
        report: Dict[str, Any],
    ):
        self._data = data
        self._message_transform = message_transform
        self._model_transform = model_transform
        self._prepare_sample = SFTTransform(
            message_transform=message_transform, model_transform=model_transform
        )
        self.report = report


def check_instruction_record(record: Mapping[str, Any], index: int, file: Any) -> Dict[str, str]:
    """``{instruction, input, output}`` from one record; a missing or null input becomes "".

    Raises:
        DataError: a missing ``instruction``/``output`` or a field that is not a string.
    """
    if not isinstance(record, Mapping):
        raise DataError(f"expected an object, got {type(record).__name__}", file=file, record=index)
    row = {}
    for field in FIELDS:
        value = record.get(field)
        if value is None and field == "input":
            value = ""
        if value is None:
            present = ", ".join(sorted(map(str, record))) or "none"
            raise DataError(
                f"missing field {field!r} (fields present: {present})", file=file, record=index
            )
        if not isinstance(value, str):
            raise DataError(
                f"field {field!r} must be a string, got {type(value).__name__}: {value!r:.60}",
                file=file,
                record=index,
            )
        row[field] = value
    return row


def _slice(data: datasets.Dataset, split: str, file: Any) -> datasets.Dataset:
    """Apply a ``split`` spec such as ``"train[:10%]"`` to rows read from local files."""
    if split == "train":
        return data
    try:
        parts = datasets.ReadInstruction.from_spec(split).to_absolute({"train": len(data)})
    except (ValueError, AssertionError) as e:
        raise ValueError(f"invalid split {split!r}: {e}") from None
    indices: List[int] = []
    for part in parts:
        if part.splitname != "train":
            raise ValueError(
                f"{file}: local files hold one split, 'train'; got split={split!r}"
            )
        indices.extend(range(part.from_, part.to))
    return data.select(indices)


def load_instruction_rows(
    source: str,
    *,
    data_files: Optional[Union[str, Sequence[str]]] = None,
    split: str = "train",
    **load_dataset_kwargs: Any,
) -> datasets.Dataset:
    """Rows ``{instruction, input, output}`` from local JSON/JSONL files or a Hub dataset.

    ``source="json"`` with ``data_files`` is read and checked here (each file a JSON array or
    JSON Lines of objects); any other source goes to ``datasets.load_dataset`` and its rows are
    checked afterwards.

    Raises:
        DataError: malformed file or record (file and record index named).
    """
    if source == "json":
        if not data_files:
            raise ValueError("source='json' needs data_files (a path or a list of paths)")
        files = [data_files] if isinstance(data_files, (str, Path)) else list(data_files)
        rows = []
        for file in files:
            records = read_json_records(file)
            if not records:
                raise DataError("holds no records", file=file)
            rows += [check_instruction_record(r, i, file) for i, r in enumerate(records)]
        return _slice(datasets.Dataset.from_list(rows), split, ", ".join(map(str, files)))
    if data_files is not None:
        load_dataset_kwargs["data_files"] = data_files
    data = datasets.load_dataset(source, split=split, **load_dataset_kwargs)
    return check_loaded_rows(data, source if data_files is None else f"{source} {data_files}")


def check_loaded_rows(data: datasets.Dataset, source: Any) -> datasets.Dataset:
    """Check every row of a dataset from ``datasets.load_dataset`` (batches of 10,000, so the
    rows are never all in Python at once) and keep its ``{instruction, [input], output}`` columns.

    Raises:
        DataError: a missing column, or a record whose fields are missing or not strings.
    """
    missing = [f for f in ("instruction", "output") if f not in data.column_names]
    if missing:
        raise DataError(
            f"missing column(s) {missing}; columns are {data.column_names}", file=source
        )
    present = [f for f in FIELDS if f in data.column_names]
    index = 0
    for batch in data.select_columns(present).iter(batch_size=10_000):
        for values in zip(*(batch[f] for f in present)):
            check_instruction_record(dict(zip(present, values)), index, source)
            index += 1
    return data.select_columns(present)


def holdout_split(
    data: datasets.Dataset, fraction: float, seed: int, part: str, indices_dir: Optional[Union[str, Path]] = None
) -> datasets.Dataset:
    """One side of a shuffled train/validation split, made as the study made it:
    ``Dataset.train_test_split(test_size=fraction, shuffle=True, seed=seed)`` (the validation
    side has ``ceil(fraction * n)`` rows). The split's index mappings are kept in memory, or
    written under ``indices_dir`` when given (needed for rows backed by Arrow files)."""
    if part not in HOLDOUT_PARTS:
        raise ValueError(f"holdout must be one of {HOLDOUT_PARTS}, got {part!r}")
    if not 0 < fraction < 1:
        raise ValueError(f"holdout_fraction must be between 0 and 1, got {fraction}")
    if indices_dir is not None:
        parts = data.train_test_split(
            test_size=fraction,
            shuffle=True,
            seed=seed,
            train_indices_cache_file_name=str(Path(indices_dir) / "holdout-train-indices.arrow"),
            test_indices_cache_file_name=str(Path(indices_dir) / "holdout-test-indices.arrow"),
        )
        return parts["train" if part == "train" else "test"]
    parts = data.train_test_split(test_size=fraction, shuffle=True, seed=seed, keep_in_memory=True)
    return parts["train" if part == "train" else "test"]


def build_instruct_dataset(
    tokenizer: ModelTokenizer,
    data: datasets.Dataset,
    *,
    report: Dict[str, Any],
    template: str = "medalpaca",
    train_on_input: bool = True,
    system_prompt: Optional[str] = None,
    filter_fn: Optional[Callable] = None,
    holdout_fraction: Optional[float] = None,
    holdout_seed: int = 42,
    holdout: str = "train",
    decontaminate: Optional[Mapping[str, str]] = None,
    decontaminate_ngram: int = 13,
    packed: bool = False,
) -> Union[InstructDataset, PackedDataset]:
    """Filter, split, decontaminate, then wrap ``data`` for training; see the builders' docs.

    Order: ``filter_fn``, the holdout split (on the whole set, so it is the study's split), then
    decontamination of the side that is returned.
    """
    message_transform = InstructToMessages(
        template=template, train_on_input=train_on_input, system_prompt=system_prompt
    )
    report["rows"] = len(data)
    if filter_fn is not None:
        data = data.filter(filter_fn, keep_in_memory=True)
        report["after_filter"] = len(data)
    if holdout_fraction is not None:
        size = len(data)
        data = holdout_split(data, holdout_fraction, holdout_seed, holdout)
        report["holdout"] = {
            "fraction": holdout_fraction,
            "seed": holdout_seed,
            "part": holdout,
            "train": size - len(data) if holdout == "validation" else len(data),
            "validation": len(data) if holdout == "validation" else size - len(data),
        }
    if decontaminate:
        checker = Decontaminator(decontaminate, ngram=decontaminate_ngram)
        kept, report["decontamination"] = checker.filter(data)
        data = data.select(kept)
    report["final"] = len(data)
    log.info(f"{report.get('name', 'dataset')}: {summary(report)}")
    ds = InstructDataset(
        data,
        message_transform=message_transform,
        model_transform=model_transform_for(template, tokenizer),
        report=report,
    )
    if packed:
        if tokenizer.max_seq_len is None:
            raise ValueError("PackedDataset requires a max_seq_len to be set on the tokenizer.")
        return PackedDataset(ds, max_seq_len=tokenizer.max_seq_len)
    return ds


def summary(report: Mapping[str, Any]) -> str:
    """A one-line account of a build report: rows in, filtered, split and removed, rows out."""
    parts = [f"{report['rows']} rows"]
    if "after_filter" in report:
        parts.append(f"{report['after_filter']} after filter_fn")
    if "holdout" in report:
        h = report["holdout"]
        parts.append(f"{h['train']} train / {h['validation']} validation (seed {h['seed']}, kept {h['part']})")
    if "decontamination" in report:
        parts.append(f"{report['decontamination']['removed']} removed by decontamination")
    parts.append(f"{report['final']} used")
    return ", ".join(parts)


def take_amount(data: datasets.Dataset, amount: Optional[Union[int, float]], mix_seed: int) -> datasets.Dataset:
    """The whole set (``amount`` None or above its size), or a random sample of ``amount`` rows
    (an int) or of that fraction (a float), drawn with ``mix_seed`` and kept in the set's order."""
    available = len(data)
    if amount is None:
        return data
    take = min(amount, available) if isinstance(amount, int) else round(amount * available)
    if take < available:
        data = data.select(sorted(random.Random(mix_seed).sample(range(available), take)))
    return data
