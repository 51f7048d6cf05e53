"""Medical Meadow (medAlpaca's instruction sets): one builder per set, plus a general one.

Each set is ``{instruction, input, output}`` on the Hub as ``medalpaca/medical_meadow_<name>``
(names and sizes: :data:`MEDICAL_MEADOW_SETS`), or any local JSON/JSONL file with those fields
via ``source="json", data_files=...``.
"""

from functools import partial
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Union

from torchtune.datasets import PackedDataset
from torchtune.modules.transforms.tokenizers import ModelTokenizer

from components.data.instruct import InstructDataset, build_instruct_dataset, load_instruction_rows

#: Row counts of the eight sets in the study's training mix, from the study's repository
#: (recorded in ../shared/data/README.md); they sum to 895,753. medAlpaca's DATA_DESCIPTION.md
#: lists the same sizes for six sets, and 1,056,660 (CORD-19) and 67,704 (WikiDoc textbook) for
#: the sources the ``cord19`` and ``wikidoc`` Hub sets were drawn from.
MEDICAL_MEADOW_SETS: Dict[str, int] = {
    "cord19": 821_007,
    "medical_flashcards": 33_955,
    "wikidoc": 10_000,
    "wikidoc_patient_information": 5_942,
    "mediqa": 2_208,
    "medqa": 10_178,
    "mmmlu": 3_787,
    "health_advice": 8_676,
}
STUDY_MIX_ROWS = sum(MEDICAL_MEADOW_SETS.values())
HUB_PREFIX = "medalpaca/medical_meadow_"


def hub_id(name: str) -> str:
    """``medalpaca/medical_meadow_<name>`` for a set name (with or without that prefix)."""
    return HUB_PREFIX + set_name(name)


def set_name(name: str) -> str:
    """The short set name (``cord19``) from ``cord19``, ``medical_meadow_cord19`` or the hub id."""
    short = name.split("/")[-1]
    short = short[len("medical_meadow_") :] if short.startswith("medical_meadow_") else short
    if short not in MEDICAL_MEADOW_SETS:
        raise ValueError(
            f"unknown Medical Meadow set {name!r}; expected one of {', '.join(MEDICAL_MEADOW_SETS)}"
        )
    return short


def medical_meadow_dataset(
    tokenizer: ModelTokenizer,
    *,
    source: str,
    data_files: Optional[Union[str, Sequence[str]]] = None,
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
    **load_dataset_kwargs: Dict[str, Any],
) -> Union[InstructDataset, PackedDataset]:
    """A Medical Meadow set (or any ``{instruction, input, output}`` data) for SFT.

    Args:
        tokenizer (ModelTokenizer): the model's tokenizer.
        source (str): a Hub dataset id, or ``"json"`` for local JSON/JSONL ``data_files``.
        data_files (Optional[Union[str, Sequence[str]]]): local file(s) when ``source="json"``.
        template (str): ``"medalpaca"`` (the study's), ``"alpaca"`` or ``"llama3_chat"``; see
            :mod:`components.data.templates`. Default ``"medalpaca"``.
        train_on_input (bool): train on the prompt too. Default True, as the study did.
        system_prompt (Optional[str]): system turn, ``llama3_chat`` only.
        holdout_fraction (Optional[float]): split off this fraction as validation, shuffled with
            ``holdout_seed``, as ``datasets.Dataset.train_test_split`` does (the study: 0.1, 42).
            Default None: no split.
        holdout_seed (int): seed of that shuffle. Default 42.
        holdout (str): which side to return, ``"train"`` or ``"validation"``. Default "train".
        decontaminate (Optional[Mapping[str, str]]): evaluation sets to remove overlaps with,
            name -> local path (``usmle``, ``medquad_test``, ``medqa_test``); see
            :mod:`components.data.decontaminate`. Default None.
        decontaminate_ngram (int): n-gram length in words for that. Default 13.
        packed (bool): pack to ``tokenizer.max_seq_len``. Default False.
        filter_fn (Optional[Callable]): keep rows for which it returns True, before the split.
        split (str): ``split`` for ``load_dataset``; local files hold ``"train"`` (slices such as
            ``"train[:10%]"`` work). Default "train".
        **load_dataset_kwargs: passed to ``datasets.load_dataset`` for Hub sources.

    Returns:
        Union[InstructDataset, PackedDataset]: an ``SFTDataset`` with a ``report`` of row counts.

    Raises:
        DataError: a malformed file or record (named in the message); nothing is skipped.
    """
    data = load_instruction_rows(source, data_files=data_files, split=split, **load_dataset_kwargs)
    report = {"name": "medical_meadow", "source": source if data_files is None else str(data_files)}
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


def _set_builder(name: str) -> Callable[..., Union[InstructDataset, PackedDataset]]:
    builder = partial(medical_meadow_dataset, source=hub_id(name))
    builder.__doc__ = (
        f"Medical Meadow ``{name}`` ({MEDICAL_MEADOW_SETS[name]:,} rows in the study), from "
        f"``{hub_id(name)}`` by default. Same arguments as :func:`medical_meadow_dataset`; "
        f"pass ``source='json', data_files=...`` for a local copy."
    )
    return builder


medical_meadow_cord19 = _set_builder("cord19")
medical_meadow_medical_flashcards = _set_builder("medical_flashcards")
medical_meadow_wikidoc = _set_builder("wikidoc")
medical_meadow_wikidoc_patient_information = _set_builder("wikidoc_patient_information")
medical_meadow_mediqa = _set_builder("mediqa")
medical_meadow_medqa = _set_builder("medqa")
medical_meadow_mmmlu = _set_builder("mmmlu")
medical_meadow_health_advice = _set_builder("health_advice")
