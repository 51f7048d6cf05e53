#!/usr/bin/env bash
# The 3B configs on one NVIDIA GPU, no network, against the study's Hugging Face Trainer stack.
#
#   bash benchmarks/gpu_check.sh [WORK_DIR]          # one GPU: random 3B, 20 steps a method
#   bash benchmarks/gpu_check.sh --dry [WORK_DIR]    # CPU: tiny shape, 2 steps (tests/test_gpu_check.py)
#
# 1. benchmarks/shape_check.py build: a random Llama 3.2 3B in `tune download`'s layout.
# 2. Ours: full SFT, LoRA, QLoRA, GaLore (one optimizer and layer-wise) and KnowTuning stage 2
#    (DPO), each by the `tune run` line of its configs/llama3_2_3B/*.yaml header, as shipped
#    (compile, bf16, batch, accumulation) except: local data (the shipped sample, each set twice,
#    so 20 steps of 4 x 6 rows exist), shuffle=False (the peer reads rows in order),
#    max_steps_per_epoch=$STEPS.
# 3. Peer: benchmarks/hf_peer.py peer, the study's Trainer stack (transformers + PEFT / bitsandbytes
#    / galore-torch, gradient checkpointing, bf16) on the same checkpoint and the same token lists.
# 4. One table: label tokens/s (median from step 2 on; step 1 holds compile), peak GPU memory,
#    ours/peer, and the first step's loss on both sides. Also written to WORK_DIR/table.md.
#
# Dry mode: the tiny shape on CPU, 2 steps, compile off and fp32 on our side (what the CPU peer
# runs), METHODS="lora" unless set. Environment: METHODS, STEPS, PYTHON, CAP_GIB.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
if [[ "${1:-}" == "--dry" ]]; then DRY=1; shift; fi
WORK="${1:-$(mktemp -d "${TMPDIR:-/tmp}/medtune-gpu-check.XXXXXX")}"
mkdir -p "$WORK"
PY="${PYTHON:-python}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MEDTUNE_CACHE_DIR="${MEDTUNE_CACHE_DIR:-$WORK/cache}"

if [[ $DRY == 1 ]]; then
  SHAPE=tiny; DEVICE=cpu; STEPS="${STEPS:-2}"; METHODS="${METHODS:-lora}"
  OURS_OVERRIDES=(compile=False dtype=fp32 shuffle=False)
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
else
  SHAPE=3b; DEVICE=cuda; STEPS="${STEPS:-20}"
  METHODS="${METHODS:-full lora qlora galore galore_layerwise knowtuning_kc}"
  OURS_OVERRIDES=(shuffle=False)
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi

echo "== building the random $SHAPE checkpoint in $WORK/model"
"$PY" benchmarks/shape_check.py build --shape "$SHAPE" --out "$WORK/model"

# the shipped Medical Meadow sample, every set twice: 576 training rows after the 10% holdout
"$PY" - "$WORK/meadow" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
for f in sorted(Path("components/data/sample/medical_meadow").glob("*.json")):
    (out / f.name).write_text(json.dumps(json.loads(f.read_text()) * 2))
EOF

config_of() {
  "$PY" -c "import sys; sys.path.insert(0, 'benchmarks'); from hf_peer import GPU_CHECK; c, p = GPU_CHECK['$1']; print(c, p or '')"
}

rm -f "$WORK/ours.jsonl"
mkdir -p "$WORK/peer"
for method in $METHODS; do
  read -r config peer <<<"$(config_of "$method")"
  echo "== ours: $method (configs/llama3_2_3B/$config.yaml)"
  "$PY" benchmarks/shape_check.py run --model-dir "$WORK/model" --shape "$SHAPE" --device "$DEVICE" \
    --configs "$config" --steps "$STEPS" --meadow-dir "$WORK/meadow" --work "$WORK/ours" \
    --cap-gib "${CAP_GIB:-60}" --timeout 900 --out "$WORK/ours.jsonl" \
    --device-overrides "${OURS_OVERRIDES[@]}" >/dev/null || echo "   failed: see $WORK/ours/$config.log"
  if [[ -n "$peer" ]]; then
    echo "== peer: $method"
    "$PY" benchmarks/hf_peer.py peer --method "$peer" --steps "$STEPS" --model-dir "$WORK/model" \
      --config "configs/llama3_2_3B/$config.yaml" --meadow-dir "$WORK/meadow" --device "$DEVICE" \
      --json "$WORK/peer/$peer.json" >"$WORK/peer/$peer.log" 2>&1 || echo "   failed: see $WORK/peer/$peer.log"
  fi
done

"$PY" benchmarks/hf_peer.py gpu-table "$WORK/ours.jsonl" "$WORK/peer" | tee "$WORK/table.md"
echo "(results: $WORK)"
