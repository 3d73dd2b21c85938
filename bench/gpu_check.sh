#!/usr/bin/env bash
# The device checks for the day a GPU is lent; nothing in CI depends on this. Under 8 minutes
# on one H200 (about 2 of it building random-init models on the CPU), nothing downloaded:
#   1. bench_train_step.py: the Qwen1.5-0.5B / CLIP-L/336-shape training step in bf16 autocast,
#      stage 1 at V = 4 and stage 2 at V = 4 and 576, loss on all positions vs labels only:
#      step time, tokens/s, MFU, torch.cuda peak memory (micro-batch 8, LLaVA's is 16)
#   2. bench_prefill.py on the same 0.5B-shape LLM, written like a hub checkpoint
# and writes both into one JSON file.
#
#   bash bench/gpu_check.sh [OUT.json]          (default out/gpu_check.json; PYTHON=... to pick one)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-out/gpu_check.json}
python=${PYTHON:-python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
start=$SECONDS

"$python" bench/bench_train_step.py --device cuda --micro-batch 8 --out "$work/train_step.json"
"$python" -c "import sys; sys.path.insert(0, 'bench'); import common; common.save_real_shape_models('$work/models')"
"$python" bench/bench_prefill.py --device cuda --llm "$work/models/llm" --out "$work/prefill.json"

mkdir -p "$(dirname "$out")"
"$python" - "$work" "$out" $((SECONDS - start)) <<'EOF'
import json, sys
work, out, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3])
result = {name: json.load(open(f"{work}/{name}.json")) for name in ("train_step", "prefill")}
result["seconds"] = seconds
json.dump(result, open(out, "w"), indent=2)
print(f"wrote {out} ({seconds} s)")
EOF
