"""Knob effects with the machine's load cancelled: one process, variants taking turns step by step.

The recipe-level runs (knobs.py) each take minutes, and on a shared, loaded 2-core machine the
load changes between runs by more than the knobs' effects. Here every variant is its own copy
of the tiny Llama 3.2 (torchtune's builder, fp32, one thread) with its own AdamW, trained the way
the recipes train (forward, loss, backward, clip at 1.0, step), and the variants alternate step by
step (rotating order), so all see the same load. Each variant walks the same sample data in the
same order: batches of 4 sequences padded to the longest (torchtune's padded_collate_sft), or, for
`packed`, batches of 4 packs of 256 (PackedDataset + padded_collate_packed, block-causal masks).
Rate = real (non-padding) tokens / step time, first `--warmup` steps left out; medians of steps too.

    python benchmarks/knobs_inproc.py --steps 40 --warmup 3
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import speed_common as sc  # noqa: E402

VARIANTS = {
    "baseline: AC on, chunked CE, unpacked": dict(ac=True, chunked=True, packed=False),
    "AC off": dict(ac=False, chunked=True, packed=False),
    "plain CrossEntropyLoss": dict(ac=True, chunked=False, packed=False),
    "packed": dict(ac=True, chunked=True, packed=True),
    "AC off + plain CE": dict(ac=False, chunked=False, packed=False),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=3)
    a = ap.parse_args()
    import torch
    import torch.nn.functional as F
    from torchtune import training
    from torchtune.data import padded_collate_packed, padded_collate_sft
    from torchtune.datasets import PackedDataset
    from torchtune.modules import TransformerSelfAttentionLayer
    from torchtune.modules.loss import CEWithChunkedOutputLoss

    from components.models import tiny_llama3_2

    torch.set_num_threads(1)
    tok, ds = sc.dataset()
    seqs = [ds[i] for i in range(len(ds))]
    packs = list(PackedDataset(ds, max_seq_len=sc.MAX_SEQ_LEN))

    def batches(packed):
        if packed:
            for i in range(0, len(packs) - 3, 4):
                yield padded_collate_packed(packs[i:i + 4])
        else:
            for i in range(0, len(seqs) - 3, 4):
                yield padded_collate_sft(seqs[i:i + 4], padding_idx=tok.pad_id, ignore_idx=-100)

    real_unpacked = [sum(len(s["tokens"]) for s in seqs[i:i + 4]) for i in range(0, len(seqs) - 3, 4)]
    units = sc.unit_counts(packed=True)
    assert len(units) == len(packs)
    real_packed = [sum(u["real"] for u in units[i:i + 4]) for i in range(0, len(packs) - 3, 4)]

    state = {}
    torch.manual_seed(0)
    init = tiny_llama3_2().state_dict()
    for name, v in VARIANTS.items():
        m = tiny_llama3_2()
        m.load_state_dict(init)
        if v["ac"]:
            training.set_activation_checkpointing(m, auto_wrap_policy={TransformerSelfAttentionLayer})
        loss_fn = CEWithChunkedOutputLoss() if v["chunked"] else None
        if v["chunked"]:
            m.set_num_output_chunks(loss_fn.num_output_chunks)
        opt = torch.optim.AdamW(m.parameters(), lr=2e-5, weight_decay=0.01)
        state[name] = dict(model=m, loss_fn=loss_fn, opt=opt, it=batches(v["packed"]),
                           real=real_packed if v["packed"] else real_unpacked, times=[], toks=[], **v)

    def step(s):
        b = next(s["it"])
        labels = b["labels"]
        labels = torch.hstack((labels[..., 1:], torch.full((labels.shape[0], 1), -100)))
        kw = {"mask": b["mask"], "input_pos": b["input_pos"]} if s["packed"] else {}
        logits = s["model"](b["tokens"], **kw)
        if s["chunked"]:
            loss = s["loss_fn"](logits, labels)
        else:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100)
        del logits
        loss.backward()
        torch.nn.utils.clip_grad_norm_(s["model"].parameters(), 1.0)
        s["opt"].step()
        s["opt"].zero_grad(set_to_none=True)
        return float(loss.detach())

    names = list(VARIANTS)
    n = min(a.steps, len(real_packed), len(real_unpacked))
    for k in range(n):
        order = names[k % len(names):] + names[:k % len(names)]
        for name in order:
            s = state[name]
            t0 = time.perf_counter()
            step(s)
            s["times"].append(time.perf_counter() - t0)
            s["toks"].append(s["real"][k])
    base = state[names[0]]
    bt = sum(base["toks"][a.warmup:]) / sum(base["times"][a.warmup:])
    print(f"{n} steps per variant, first {a.warmup} left out; batch 4 (sequences or packs of 256); one thread")
    print("\n| variant | real tok/s | vs baseline | median step (s) | real tokens per step (mean) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in names:
        s = state[name]
        tps = sum(s["toks"][a.warmup:]) / sum(s["times"][a.warmup:])
        print(f"| {name} | {tps:.0f} | {tps / bt:.2f} | {sc.median(s['times'][a.warmup:]):.3f} | "
              f"{sum(s['toks']) / len(s['toks']):.0f} |")


if __name__ == "__main__":
    main()
