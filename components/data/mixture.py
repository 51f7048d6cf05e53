"""The Medical Meadow mixture: several sets, each whole, capped or sampled, concatenated.

With the defaults it is the study's mix: all eight sets in :data:`MEDICAL_MEADOW_SETS` order,
895,753 rows, then (``holdout_fraction=0.1, holdout_seed=42``) 806,177 train rows. The study's
own concatenation order is not recorded; the order here is the one its sizes were listed in, so
the 90/10 split has the study's sizes but not provably its exact rows.
"""

from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import datasets
from torchtune.datasets import PackedDataset
from torchtune.modules.transforms.tokenizers import ModelTokenizer

from components.data.errors import DataError
from components.data.instruct import InstructDataset, build_instruct_dataset, load_instruction_rows, take_amount
from components.data.medical_meadow import MEDICAL_MEADOW_SETS, hub_id, set_name
from components.data.packing import cached_packs

Amount = Optional[Union[int, float]]


def parse_sets(
    sets: Optional[Union[Mapping[str, Amount], Sequence[str]]] = None,
    caps: Optional[Sequence[Amount]] = None,
) -> List[Tuple[str, Amount]]:
    """``[(set name, amount)]`` from a mapping ``{name: amount}`` or a list of names (with an
    optional parallel list ``caps``). An amount is None (whole set), an int (at most that many
    rows) or a float in (0, 1] (that fraction of the set). None means all eight sets, whole."""
    if sets is None:
        if caps is not None:
            raise ValueError("caps needs sets: a list of set names of the same length")
        return [(name, None) for name in MEDICAL_MEADOW_SETS]
    if isinstance(sets, str):
        raise ValueError(f"sets must be a list or a mapping of set names, got the string {sets!r}")
    if isinstance(sets, Mapping):
        if caps is not None:
            raise ValueError("give amounts either in the sets mapping or in caps, not both")
        pairs = list(sets.items())
    else:
        caps = [None] * len(sets) if caps is None else list(caps)
        if len(caps) != len(sets):
            raise ValueError(f"caps has {len(caps)} entries for {len(sets)} sets")
        pairs = list(zip(sets, caps))
    out, seen = [], set()
    for name, amount in pairs:
        short = set_name(str(name))
        if short in seen:
            raise ValueError(f"set {short!r} is listed twice")
        seen.add(short)
        if isinstance(amount, bool) or not (
            amount is None
            or (isinstance(amount, int) and amount >= 0)
            or (isinstance(amount, float) and 0 < amount <= 1)
        ):
            raise ValueError(
                f"amount for {short!r} must be null, a row count >= 0 or a fraction in (0, 1], got {amount!r}"
            )
        out.append((short, amount))
    return out


def set_file(data_dir: Union[str, Path], name: str) -> Path:
    """``<data_dir>/<name>.json`` or ``.jsonl``, whichever exists."""
    for suffix in (".json", ".jsonl"):
        path = Path(data_dir) / f"{name}{suffix}"
        if path.is_file():
            return path
    raise DataError(f"no {name}.json or {name}.jsonl for set {name!r}", file=data_dir)


def load_mixture(
    sets: Optional[Union[Mapping[str, Amount], Sequence[str]]] = None,
    *,
    caps: Optional[Sequence[Amount]] = None,
    data_dir: Optional[str] = None,
    mix_seed: int = 42,
    split: str = "train",
    **load_dataset_kwargs: Any,
) -> Tuple[datasets.Dataset, Dict[str, Any]]:
    """The mixed rows and a report with, per set, rows available and rows taken.

    Capped and fractional sets are a random sample drawn with ``mix_seed``, kept in the set's
    own order; a cap above the set's size takes the whole set.
    """
    parts, per_set = [], {}
    for name, amount in parse_sets(sets, caps):
        if data_dir is not None:
            data = load_instruction_rows("json", data_files=str(set_file(data_dir, name)), split=split)
        else:
            data = load_instruction_rows(hub_id(name), split=split, **load_dataset_kwargs)
        available = len(data)
        data = take_amount(data, amount, mix_seed)
        per_set[name] = {"available": available, "taken": len(data), "study": MEDICAL_MEADOW_SETS[name]}
        parts.append(data)
    if not parts:
        raise ValueError("the mixture has no sets")
    mixed = datasets.concatenate_datasets(parts)
    report = {
        "name": "medical_meadow_mixture",
        "source": str(data_dir) if data_dir is not None else "hub",
        "sets": per_set,
        "mix_seed": mix_seed,
    }
    return mixed, report


def medical_meadow_mixture(
    tokenizer: ModelTokenizer,
    *,
    sets: Optional[Union[Mapping[str, Amount], Sequence[str]]] = None,
    caps: Optional[Sequence[Amount]] = None,
    data_dir: Optional[str] = None,
    mix_seed: int = 42,
    template: str = "medalpaca",
    train_on_input: bool = True,
    system_prompt: Optional[str] = None,
    holdout_fraction: Optional[float] = None,
    holdout_seed: int = 42,
    holdout: str = "train",
    decontaminate: Optional[Mapping[str, str]] = None,
    decontaminate_ngram: int = 13,
    packed: bool = False,
    filter_fn: Optional[Callable] = None,
    split: str = "train",
    cache: bool = True,
    cache_dir: Optional[str] = None,
    num_proc: Optional[int] = None,
    skip_empty: bool = False,
    long_records: str = "truncate",
    **load_dataset_kwargs: Dict[str, Any],
) -> Union[InstructDataset, PackedDataset]:
    """A mixture of Medical Meadow sets for SFT; per-set counts are in the result's ``report``.

    Args:
        tokenizer (ModelTokenizer): the model's tokenizer.
        sets: which sets and how much of each: a mapping ``{name: amount}`` (e.g.
            ``{medical_flashcards: null, cord19: 1000, wikidoc: 0.5}``) or a list of names.
            Amount None is the whole set, an int a row cap, a float a fraction. Default None:
            all eight sets, whole (the study's 895,753-row mix).
        caps (Optional[Sequence]): amounts for a list of ``sets``, in the same order.
        data_dir (Optional[str]): a folder with ``<set>.json`` (or ``.jsonl``) per set, e.g.
            ``components/data/sample/medical_meadow``; default None reads
            ``medalpaca/medical_meadow_<set>`` from the Hub.
        mix_seed (int): seed for sampling capped sets. Default 42.
        template, train_on_input, system_prompt, holdout_fraction, holdout_seed, holdout,
        decontaminate, decontaminate_ngram, packed, filter_fn, split, **load_dataset_kwargs:
            as in :func:`components.data.medical_meadow.medical_meadow_dataset`; the holdout
            split is made on the whole mixture, as the study made it.
        cache (bool): build through :mod:`components.data.pipeline`: the rows are streamed into
            Arrow, checked, split, decontaminated, templated and tokenized once, and the result
            is written to a cache folder keyed by every input and setting; the next run with the
            same key memory-maps it and does no work. Items are read from the memory-mapped
            tokens (same tokens, labels and order as ``cache=False``). With ``packed``, the packs
            are cached and memory-mapped too (:mod:`components.data.packing`; the same packs as
            torchtune's ``PackedDataset``). Default True. False: the rows are held in memory and
            tokenized lazily per item (and packed in memory).
        cache_dir (Optional[str]): the cache's root folder. Default None:
            ``$MEDTUNE_CACHE_DIR/data`` (else ``~/.cache/medtune/data``).
        num_proc (Optional[int]): processes for tokenizing when building the cache. Default
            None: 2, or 1 below 50,000 rows.
        skip_empty (bool): with the cache, drop records whose output is blank (counted in
            ``report["skipped"]["empty"]``). Default False, as the study.
        long_records (str): with the cache, ``"truncate"`` records over ``max_seq_len`` tokens
            (the study's way; counted in ``report["truncated"]``) or ``"skip"`` them (counted in
            ``report["skipped"]["too_long"]``). Default "truncate".

    Returns:
        Union[InstructDataset, PackedDataset]: an ``SFTDataset`` whose ``report["sets"]`` holds
        rows available and taken per set (and the study's size for comparison).
    """
    if cache:
        from components.data.pipeline import cached_mixture

        parsed = parse_sets(sets, caps)
        if not parsed:
            raise ValueError("the mixture has no sets")
        if data_dir is not None:
            sources = {name: ("file", set_file(data_dir, name)) for name, _ in parsed}
        else:
            sources = {
                name: ("hub", datasets.load_dataset(hub_id(name), split=split, **load_dataset_kwargs))
                for name, _ in parsed
            }
        ds = cached_mixture(
            tokenizer,
            sets=parsed,
            sources=sources,
            report={"name": "medical_meadow_mixture", "source": str(data_dir) if data_dir is not None else "hub"},
            mix_seed=mix_seed,
            split=split,
            template=template,
            train_on_input=train_on_input,
            system_prompt=system_prompt,
            holdout_fraction=holdout_fraction,
            holdout_seed=holdout_seed,
            holdout=holdout,
            decontaminate=decontaminate,
            decontaminate_ngram=decontaminate_ngram,
            filter_fn=filter_fn,
            skip_empty=skip_empty,
            long_records=long_records,
            cache_dir=cache_dir,
            num_proc=num_proc,
            load_dataset_kwargs=load_dataset_kwargs,
        )
        if packed:
            if tokenizer.max_seq_len is None:
                raise ValueError("PackedDataset requires a max_seq_len to be set on the tokenizer.")
            # PackedDataset's packs, built once into the cache and memory-mapped (not held in RAM)
            return cached_packs(ds, max_seq_len=tokenizer.max_seq_len)
        return ds
    if skip_empty or long_records != "truncate":
        raise ValueError("skip_empty and long_records need cache=True (they are applied while tokenizing)")
    data, report = load_mixture(
        sets, caps=caps, data_dir=data_dir, mix_seed=mix_seed, split=split, **load_dataset_kwargs
    )
    return build_instruct_dataset(
        tokenizer,
        data,
        report=report,
        template=template,
        train_on_input=train_on_input,
        system_prompt=system_prompt,
        filter_fn=filter_fn,
        holdout_fraction=holdout_fraction,
        holdout_seed=holdout_seed,
        holdout=holdout,
        decontaminate=decontaminate,
        decontaminate_ngram=decontaminate_ngram,
        packed=packed,
    )
