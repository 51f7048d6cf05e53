"""Packing into the cache (components.data.packing): the same packs as torchtune's PackedDataset,
built once, reused, rebuilt when a setting changes, and no complete-looking folder from a build
that was interrupted."""

import pickle
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader
from torchtune.data import padded_collate_packed
from torchtune.datasets import PackedDataset

from components.data import cache_store, medical_meadow_mixture, packing, pipeline
from components.models import tiny_llama3_2_tokenizer

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "components" / "data" / "sample" / "medical_meadow"
KEYS = ("tokens", "labels", "input_pos", "seq_lens")


def _left(folder: Path) -> list:
    """What a build left in ``folder``, but for its lock file (kept: removing it would race)."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".lock-"))


@pytest.fixture(scope="module")
def tok256():
    return tiny_llama3_2_tokenizer(max_seq_len=256)


@pytest.fixture(scope="module")
def source(tmp_path_factory, tok256):
    """A row cache over the shipped sample (three sets, 90 % train part): 140-odd rows, many
    longer than 64 tokens, some cut at 256."""
    cache = tmp_path_factory.mktemp("rows")
    ds = medical_meadow_mixture(tok256, data_dir=str(SAMPLE), sets=["medical_flashcards", "wikidoc", "mediqa"],
                                holdout_fraction=0.1, cache_dir=str(cache))
    assert isinstance(ds, pipeline.CachedInstructDataset)
    return ds


@pytest.fixture
def small_batches(monkeypatch):
    """Read the source 7 rows at a time and write 1,280 tokens of packs per record batch (20 packs
    of 64, 5 of 256, 1 of 1,024), so both have many boundaries even on the small sample."""
    monkeypatch.setattr(packing, "ROW_BATCH", 7)
    monkeypatch.setattr(packing, "BATCH_TOKENS", 5 * 256)


def _same_packs(got, ref):
    assert len(got) == len(ref)
    for i in range(len(ref)):
        a, b = got[i], ref[i]
        assert set(a) == set(b) == set(KEYS)
        for key in KEYS:
            assert a[key].dtype == b[key].dtype == torch.long, key
            assert torch.equal(a[key], b[key]), (i, key)


def _folders(root: Path):
    return sorted(p.name for p in root.glob("packs-*") if (p / "report.json").is_file())


@pytest.mark.parametrize("split_across_pack", [False, True])
@pytest.mark.parametrize("max_seq_len", [64, 256, 300, 1024])
def test_same_packs_as_torchtune(tmp_path, source, small_batches, max_seq_len, split_across_pack):
    lengths = [len(source[i]["tokens"]) for i in range(len(source))]
    assert max(lengths) == 256 and sum(n > 64 for n in lengths) > 10
    kwargs = dict(max_seq_len=max_seq_len, padding_idx=0, split_across_pack=split_across_pack)
    if max_seq_len < max(lengths) and not split_across_pack:
        # rows longer than max_seq_len: torchtune refuses them, and so does the cache, leaving nothing
        with pytest.raises(ValueError, match=r"Dataset sample is too long \(\d+ > 64\)"):
            PackedDataset(source, **kwargs)
        with pytest.raises(ValueError, match=r"Dataset sample is too long \(\d+ > 64\)"):
            packing.cached_packs(source, cache_dir=tmp_path, **kwargs)
        assert _left(tmp_path) == []
        return
    ref = PackedDataset(source, max_packs=None, **kwargs)
    got = packing.cached_packs(source, cache_dir=tmp_path, **kwargs)
    assert isinstance(got, packing.CachedPackedDataset) and isinstance(got, PackedDataset)
    _same_packs(got, ref)
    assert got[-1]["tokens"].tolist() == ref[-1]["tokens"].tolist()
    with pytest.raises(IndexError):
        got[len(got)]
    assert len(list(got)) == len(ref)  # iteration stops where PackedDataset's does
    p = got.report["packing"]
    assert p["packs"] == len(ref) and p["rows"] == len(source) and p["tokens"] == sum(lengths)
    assert p["padding_tokens"] == len(ref) * max_seq_len - sum(lengths)
    assert {k: v for k, v in got.report.items() if k != "packing"} == source.report


def test_same_packs_as_torchtune_on_random_rows(tmp_path):
    """Any dataset of {tokens, labels}: random lengths, empty rows, rows of exactly max_seq_len and
    (split across packs) rows several packs long, any padding_idx."""
    rng = random.Random(0)
    for trial in range(120):
        max_seq_len = rng.choice([1, 2, 3, 5, 8, 16])
        split = trial % 2 == 1
        longest = 3 * max_seq_len + 2 if split else max_seq_len
        rows = []
        for _ in range(rng.randrange(0, 25)):
            n = rng.choice([0, 1, max_seq_len, longest, rng.randrange(0, longest + 1)])
            tokens = [rng.randrange(0, 5000) for _ in range(n)]
            rows.append({"tokens": tokens, "labels": [t if rng.random() < 0.5 else -100 for t in tokens]})
        kwargs = dict(max_seq_len=max_seq_len, padding_idx=rng.choice([0, 7]), split_across_pack=split)
        got = packing.cached_packs(rows, cache_dir=tmp_path / str(trial), source_key=f"rows-{trial}", **kwargs)
        _same_packs(got, PackedDataset(rows, **kwargs))


def test_second_run_reuses_the_packs_and_a_change_rebuilds(tmp_path, tok256, monkeypatch):
    kwargs = dict(data_dir=str(SAMPLE), sets=["mmmlu", "mediqa"], cache_dir=str(tmp_path))
    rows = medical_meadow_mixture(tok256, **kwargs)
    builds, rows_packed = packing.STATS["builds"], packing.STATS["rows_packed"]
    first = medical_meadow_mixture(tok256, packed=True, **kwargs)
    assert packing.STATS["builds"] == builds + 1 and packing.STATS["rows_packed"] == rows_packed + len(rows)
    assert first.report["packing"]["cache"]["hit"] is False
    packed_root = rows.cache_dir / "packed"
    assert len(_folders(packed_root)) == 1

    def forbidden(*args, **kwargs):
        raise AssertionError("a packed cache hit must not pack anything")

    with monkeypatch.context() as m:
        m.setattr(packing, "write_packs", forbidden)
        m.setattr(packing, "iter_rows", forbidden)
        m.setattr(packing._Packer, "add", forbidden)
        again = medical_meadow_mixture(tok256, packed=True, **kwargs)
    assert packing.STATS["builds"] == builds + 1 and packing.STATS["rows_packed"] == rows_packed + len(rows)
    assert again.report["packing"]["cache"]["hit"] is True and again.folder == first.folder
    _same_packs(again, first)
    # another max_seq_len (the tokenizer's, which keys the rows too), split_across_pack or padding_idx
    tok128 = tiny_llama3_2_tokenizer(max_seq_len=128)
    shorter = medical_meadow_mixture(tok128, packed=True, **kwargs)
    assert shorter.report["packing"]["cache"]["hit"] is False and shorter.max_seq_len == 128
    _same_packs(shorter, PackedDataset(medical_meadow_mixture(tok128, **kwargs), max_seq_len=128))
    longer = packing.cached_packs(rows, max_seq_len=512)
    split = packing.cached_packs(rows, max_seq_len=256, split_across_pack=True)
    padded = packing.cached_packs(rows, max_seq_len=256, padding_idx=5)
    assert packing.STATS["builds"] == builds + 5
    assert len({p.folder for p in (first, longer, split, padded)}) == 4
    assert len(_folders(packed_root)) == 4
    _same_packs(longer, PackedDataset(rows, max_seq_len=512))
    _same_packs(split, PackedDataset(rows, max_seq_len=256, split_across_pack=True))
    _same_packs(padded, PackedDataset(rows, max_seq_len=256, padding_idx=5))


def test_an_interrupted_build_leaves_nothing_complete(tmp_path, source, small_batches, monkeypatch):
    real_iter_rows = packing.iter_rows
    seen = []

    def interrupted(ds):
        for i, row in enumerate(real_iter_rows(ds)):
            if i == len(ds) // 2:
                raise KeyboardInterrupt  # Ctrl-C halfway through
            seen.append(i)
            yield row

    with monkeypatch.context() as m:
        m.setattr(packing, "iter_rows", interrupted)
        writes = []
        real_flush = packing._PackWriter.flush
        m.setattr(packing._PackWriter, "flush", lambda self: (writes.append(self.n), real_flush(self)))
        with pytest.raises(KeyboardInterrupt):
            packing.cached_packs(source, max_seq_len=256, cache_dir=tmp_path)
    assert len(seen) == len(source) // 2 and sum(writes) > 5  # packs had been written when it stopped
    assert _folders(tmp_path) == [] and _left(tmp_path) == []

    # a build that was killed (its process gone) leaves a temporary folder; the next build removes it
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    key = packing.packing_key(source.report["cache"]["key"], max_seq_len=256, padding_idx=0, split_across_pack=False)
    leftover = tmp_path / f".tmp-{key[:12]}-{dead.pid}-deadbeef-{cache_store.host_name()}"
    leftover.mkdir()
    (leftover / packing.PACKS_FILE).write_bytes(b"half a file")
    (leftover / packing.REPORT).write_text("{}")  # even a report: it is not where a cache is looked for
    built = packing.cached_packs(source, max_seq_len=256, cache_dir=tmp_path)
    assert built.report["packing"]["cache"]["hit"] is False
    assert not leftover.exists() and _folders(tmp_path) == [built.folder.name]
    assert [p.name for p in _left(tmp_path)] == [built.folder.name]
    _same_packs(built, PackedDataset(source, max_seq_len=256))


def test_mixture_packed_cache_gives_the_same_batches(tmp_path, tok256):
    kwargs = dict(data_dir=str(SAMPLE), sets=["medqa", "wikidoc", "mmmlu"], holdout_fraction=0.1, packed=True)
    cached = medical_meadow_mixture(tok256, cache_dir=str(tmp_path), **kwargs)
    lazy = medical_meadow_mixture(tok256, cache=False, **kwargs)
    assert type(cached) is packing.CachedPackedDataset and type(lazy) is PackedDataset
    assert cached.report["packing"]["packs"] == len(cached) == len(lazy)
    assert cached.report["final"] == lazy.ds.report["final"] == cached.report["packing"]["rows"]
    _same_packs(cached, lazy)
    # batches as the recipes make them (torchtune's collate for packs), and after pickling
    # (DataLoader workers started with spawn get a pickled copy that reopens the files)
    copy = pickle.loads(pickle.dumps(cached))
    assert len(pickle.dumps(cached)) < 100_000
    loaders = [DataLoader(d, batch_size=4, collate_fn=padded_collate_packed, drop_last=True) for d in (cached, copy, lazy)]
    batches = [list(loader) for loader in loaders]
    assert len(batches[0]) == len(lazy) // 4 > 3
    for ours, pickled, ref in zip(*batches):
        for batch in (ours, pickled):
            assert set(batch) == set(ref) == {"tokens", "labels", "input_pos", "mask"}
            for key in ref:
                a, b = batch[key], ref[key]
                if hasattr(b, "to_dense"):  # a flex-attention BlockMask (on GPUs)
                    a, b = a.to_dense(), b.to_dense()
                assert a.dtype == b.dtype and torch.equal(a, b), key


def test_max_seq_len_is_required(tmp_path):
    tok = tiny_llama3_2_tokenizer(max_seq_len=None)
    with pytest.raises(ValueError, match="PackedDataset requires a max_seq_len"):
        medical_meadow_mixture(tok, data_dir=str(SAMPLE), sets=["mmmlu"], packed=True, cache_dir=str(tmp_path))
