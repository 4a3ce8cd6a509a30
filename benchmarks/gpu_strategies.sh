#!/usr/bin/env bash
# `minillm train --strategy S` end to end on a GPU box, with NCCL: for each of single, ddp, zero1,
# zero2 and fsdp, the tiny preset (AdamW, bf16) trains 40 steps with checkpoints at 20 and 40, then
# a second run resumes from the checkpoint at 20 (the one at 40 removed) and must reach step 40
# again. It prints each run's last logged loss, tokens/s and MFU, and the resumed run's final loss
# beside the uninterrupted one's (on a GPU the two agree closely, not to the bit: cuBLAS and NCCL
# may choose other kernels). Every process is one rank: one GPU is enough.
#
#     bash benchmarks/gpu_strategies.sh [NPROC]
set -euo pipefail
NPROC=${1:-1}
W=${WORK:-/tmp/gpu-strategies}
rm -rf "$W" && mkdir -p "$W"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-}:$(pwd)/src"
DEVICE=${DEVICE:-cuda} DTYPE=${DTYPE:-bfloat16}  # DEVICE=cpu DTYPE=float32 EXTRA="..." checks the script here
read -r -a extra <<< "${EXTRA:-}"
common=(--config configs/tiny.toml --set optimizer=adamw --set lr=3e-3 --set device="$DEVICE" --set dtype="$DTYPE"
        "${extra[@]}" --set max_steps=40 --set checkpoint_every=20 --set keep_checkpoints=3 --set eval_every=20
        --set eval_batches=4 --set final_eval_batches=8 --set sample_every=0 --set log_every=10)

last() {  # the last training row and the last evaluation of a run's metrics.jsonl
  python3 - "$1/metrics.jsonl" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
train = [r for r in rows if "loss" in r]
evals = [r for r in rows if "val_loss" in r]
t, e = train[-1], evals[-1]
print(f"step {t['step']}: loss {t['loss']:.4f}, {t.get('tokens_per_s', 0):,.0f} tokens/s, "
      f"MFU {100 * t.get('mfu', 0):.1f}% | val loss {e['val_loss']:.4f} at step {e['step']}")
EOF
}

python3 -m minillm train "${common[@]}" --set out="$W/single" --force > "$W/single.log" 2>&1 || { tail -20 "$W/single.log"; exit 1; }
TOK="$W/single/tokenizer.bpe"
echo "single: $(last "$W/single")"
for s in ddp zero1 zero2 fsdp; do
  run=(python3 -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m minillm train "${common[@]}"
       --strategy "$s" --set tokenizer="$TOK" --set out="$W/$s")
  "${run[@]}" --force > "$W/$s.log" 2>&1 || { tail -30 "$W/$s.log"; exit 1; }
  echo "$s: $(last "$W/$s") | files at step 40: $(ls "$W/$s/checkpoints/step_0000040" | tr '\n' ' ')"
  cp "$W/$s/metrics.jsonl" "$W/$s.whole.jsonl"
  rm -rf "$W/$s/checkpoints/step_0000040"
  "${run[@]}" --resume > "$W/$s.resume.log" 2>&1 || { tail -30 "$W/$s.resume.log"; exit 1; }
  echo "$s resumed from step 20: $(last "$W/$s")"
done
