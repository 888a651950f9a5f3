#!/usr/bin/env bash
# On a lent GPU machine run tests/gpu_all.sh, not this: it takes these figures too (128 tokens, one
# timing each), then the recipe comparison and train.py's throughput, each part in a time box.
# This is the longer run of its decode and serve parts alone.
# Sampling at GPU speed (issue #17), about 6 minutes on one H100/H200 (run from the repo root):
#   bash tests/gpu_decode.sh
# 1. the static-cache path's tokens against the dynamic path's, bf16 greedy (agreement printed);
# 2. decode tokens/s at batch 1, 16 and 64, 124M bf16: static + CUDA graphs against the dynamic
#    path, transformers' generate, a cache-less loop and the static cache uncompiled (whether it
#    should be the default on CUDA) (bench.py --section decode);
# 3. serve.py with 1, 16 and 64 streaming clients, 124M, --compile --max_batch 64: total tokens/s
#    and time to first token, against the same requests one at a time (bench.py --section serve).
# Goals: batch 1 >= 2,000 tok/s; batch 16 >= 5x today's rate; serve at 64 clients >= 10x one at a time.
# On a lent GPU machine: `bash tests/gpu_env.sh prepare` here first (see that file).
# DRY=1 runs the same steps on a CPU with a tiny model (tests/test_serve.py does, in CI).
set -uo pipefail  # (not -e: a failing part must not cost the other part's figures)
. tests/gpu_env.sh
if [ -n "${DRY:-}" ]; then  # DRY=1: the script's logic on a CPU, with a tiny model and fewer rows
    dims="--n_layer 2 --n_head 2 --n_embd 64 --quick" decode="--decode_device cpu --decode_preset args" rows=1,4
else
    dims="--n_layer 12 --n_head 12 --n_embd 768" decode="--decode_preset gpt2" rows=1,16,64
fi
echo "== 1-2. decode"
$PY bench.py --section decode $decode $dims --decode_batches $rows --prompt_len 32 --new_tokens 256 ||
    echo "== decode FAILED: $?"
echo "== 3. serve"
$PY bench.py --section serve $dims --prompt_len 32 --new_tokens 128 --serve_clients $rows \
    --serve_flags "--max_batch ${rows##*,} --compile --max_requests 128" || echo "== serve FAILED: $?"
