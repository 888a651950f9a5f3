#!/usr/bin/env bash
# On a lent GPU machine run tests/gpu_all.sh first: it takes the figures (3.'s bf16 throughput and MFU
# among them, on the corpus) in time boxes. This script checks correctness, if the machine has time left.
# The CUDA paths the CPU suite cannot run, in about 5 minutes on one GPU (run from the repo root):
#   bash tests/gpu_check.sh
# 1. validation on CUDA under --compile is the same for B=8 and B=4 (fp32, TF32 off is not
#    needed: the val set's per-token losses are summed in float64, so the gap stays ~1e-6);
# 2. a torchrun (NCCL) run under --compile, SIGKILLed after a checkpoint, resumes through the fresh
#    store keys and logs the uninterrupted run's train losses;
# 3. 124M bf16 and fp32 throughput and MFU (fp32 against the TF32 peak).
# On a lent GPU machine: `bash tests/gpu_env.sh prepare` here first (see that file).
set -euo pipefail
. tests/gpu_env.sh
WORK=${WORK:-/tmp/gpu_check}  # shards, runs and logs (not $OUT: the device tool sends that folder back)
mkdir -p "$WORK"
$PY - "$WORK" <<'EOF'
import numpy as np, os, sys
out = sys.argv[1]
r = np.random.default_rng(0)
os.makedirs(f"{out}/rand", exist_ok=True)
np.save(f"{out}/rand/r_val_000000.npy", r.integers(0, 50257, 2_000_000, dtype=np.uint16))
np.save(f"{out}/rand/r_train_000001.npy", r.integers(0, 50257, 50_000_000, dtype=np.uint16))
EOF
# (a dry run of the script's logic on a CPU: FLAGS="--no-compile --device cpu" SKIP_SPEED=1
#  DIMS="--n_layer 2 --n_head 2 --n_embd 32 --block_size 32 --total_batch_size 256")
tiny="--path $WORK/rand ${DIMS:---n_layer 4 --n_head 4 --n_embd 256 --block_size 256 --total_batch_size 16384}
      --max_steps 30 --warmup_steps 5 --max_lr 1e-3 --min_lr 1e-4 --eval_step_interval 10 --val_tokens 100000
      --save_step 10 --hellaswag_examples 0 --sample_tokens 16 ${FLAGS:---compile --device cuda}"

echo "== 1. val loss on CUDA: B=8 vs B=4 (fp32, compile)"
$PY train.py $tiny --dtype fp32 --batch_size_per_device 8 --log_dir "$WORK/b8" > "$WORK/b8.txt" 2>&1
$PY train.py $tiny --dtype fp32 --batch_size_per_device 4 --log_dir "$WORK/b4" > "$WORK/b4.txt" 2>&1
$PY - "$WORK" <<'EOF'
import json, sys
out = sys.argv[1]
val = {k: {r["step"]: r["val_loss"] for r in map(json.loads, open(f"{out}/{k}/log.jsonl")) if "val_loss" in r} for k in ("b8", "b4")}
print("steps", sorted(val["b8"]), "max rel diff", max(abs(val["b8"][s] - val["b4"][s]) / val["b4"][s] for s in val["b8"]))
EOF

echo "== 2. torchrun (NCCL) killed after step 100's checkpoint, restarted, resumed"
long="$tiny --batch_size_per_device 8 --max_steps 300 --save_step 100 --eval_step_interval 100"
$PY -m torch.distributed.run --standalone --nproc_per_node=1 train.py $long --log_dir "$WORK/ref" > "$WORK/ref.txt" 2>&1
$PY -m torch.distributed.run --standalone --nproc_per_node=1 --max-restarts=1 train.py $long --log_dir "$WORK/killed" > "$WORK/killed.txt" 2>&1 &
TR=$!
while [ ! -d "$WORK/killed/step_000100" ] && kill -0 "$TR" 2>/dev/null; do sleep 0.02; done
pkill -KILL -P "$TR" -f -- "--log_dir $WORK/killed" || echo "nothing to kill"
wait "$TR" && echo "torchrun exit 0" || echo "torchrun exit $?"
grep -h "resuming from" "$WORK/killed.txt" || echo "NO RESUME LINE"
$PY - "$WORK" <<'EOF'
import json, sys
out = sys.argv[1]
tr = {k: {r["step"]: r["train_loss"] for r in map(json.loads, open(f"{out}/{k}/log.jsonl")) if "train_loss" in r} for k in ("ref", "killed")}
print("same steps:", sorted(tr["ref"]) == sorted(tr["killed"]),
      "max abs diff", max(abs(tr["ref"][s] - tr["killed"][s]) for s in tr["ref"]))
EOF

[ -n "${SKIP_SPEED:-}" ] && exit 0
echo "== 3. 124M throughput and MFU, bf16 and fp32 (TF32)"
for dt in bf16 fp32; do
  $PY train.py --path "$WORK/rand" --log_dir "$WORK/speed_$dt" --dtype $dt --max_steps 12 --warmup_steps 5 \
      --eval_step_interval 1000 --val_tokens 1048576 --save_step 100000 --hellaswag_examples 0 \
      --sample_tokens 0 --batch_size_per_device 32 > "$WORK/speed_$dt.txt" 2>&1
  $PY - "$WORK/speed_$dt" $dt <<'EOF'
import json, statistics, sys
recs = [r for r in map(json.loads, open(f"{sys.argv[1]}/log.jsonl")) if "train_loss" in r][2:]
print(sys.argv[2], f"{statistics.median(r['tokens_per_sec'] for r in recs):,.0f} tok/s",
      f"MFU {statistics.median(r['mfu'] for r in recs) * 100:.1f}%")
EOF
done
