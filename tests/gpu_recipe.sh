#!/usr/bin/env bash
# On a lent GPU machine run tests/gpu_all.sh, not this: it runs a one-seed version of this comparison
# (and the decode, serve and throughput figures) in a time box. This is the longer run: 2 seeds, an lr grid.
# --recipe modern against gpt2 at 124M on one GPU (bench.py --section recipe at GPU scale), about
# 8 minutes on an H100/H200 (run from the repo root):   bash tests/gpu_recipe.sh
# Data: GPT-2 tokens of ../shared/corpus (~3.3M train tokens: one pass of 100 steps x 32k), or
# DATA=<shard dir from fineweb.py> for FineWebEdu shards. The printout ends with the key ratio:
# the tokens modern needs to reach the gpt2 recipe's final val loss / gpt2's tokens.
# (A dry run of the logic on a CPU, 1 min: LAYERS=1 EMBD=64 BLOCK=64 BATCH=4 STEPS=4 VAL=4096 FLAGS="--device cpu")
# On a lent GPU machine: `bash tests/gpu_env.sh prepare` here first (see that file).
set -euo pipefail
. tests/gpu_env.sh
$PY bench.py --section recipe --recipe_layers "${LAYERS:-12}" --recipe_embd "${EMBD:-768}" \
    --recipe_block "${BLOCK:-1024}" --recipe_batch "${BATCH:-32}" --recipe_steps "${STEPS:-100}" \
    --recipe_seeds "${SEEDS:-2}" --recipe_lrs "${LRS:-6e-4,1.8e-3}" --recipe_val_tokens "${VAL:-196608}" \
    ${DATA:+--data "$DATA"} --corpus "$CORPUS" --recipe_train_flags "${FLAGS:---device cuda --dtype bf16 --no-compile}"
