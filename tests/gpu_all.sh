#!/usr/bin/env bash
# THE script to run when a GPU machine is lent: every GPU figure the repo lacks, in at most 9 minutes
# on one H100 (run from the repo root):   bash tests/gpu_all.sh
#  1. decode: greedy tokens/s at batch 1, 16 and 64, 124M bf16, 128 tokens after 32: the static cache
#     + CUDA graphs against the dynamic path, transformers' generate, a cache-less loop and the static
#     cache uncompiled, and the share of greedy tokens the paths agree on (bench.py --section decode);
#  2. serve: serve.py --compile --max_batch 64 with 1, 16 and 64 streaming clients, 64 tokens each:
#     total tokens/s and time to first token against the same requests one at a time (--section serve);
#  2b. score: serve.py scoring 200 multiple-choice examples as lm-eval sends them, 8 clients against
#     one at a time (--section score: #26's 2x goal, which a 2-core CPU cannot show);
#  3. recipe: --recipe modern as shipped against the gpt2 recipe (max_lr 6e-4), 124M bf16, one seed,
#     100 steps of 32k tokens of the corpus: the key ratio and the val losses (--section recipe);
#  4. train: train.py's 124M bf16 --compile tokens/s and MFU at 524,288 tokens a step, the median of
#     steps 2-9 (--section train);
#  5. fsdp: the same run with --fsdp against DDP, each under torchrun with one process (--section fsdp).
# Each part runs in its own time box (TIME_DECODE, TIME_SCORE, ..., TIME_TRAIN, TIME_FSDP: seconds; all
# cut to what is left of TOTAL, the whole run's): a part that fails or overruns is reported, and the
# next one runs. The run ends with the tables for BENCHMARKS.md (markdown: the date, the device, torch,
# the command; a part stopped part-way keeps the rows it had) and a line for each part. The boxes are
# estimates (no session with a GPU has run this yet): a part stopped at its box says so; widen it then.
# On a lent machine: `bash tests/gpu_env.sh prepare` here first, and carry .cache (see that file).
# DRY=1: the same steps on a CPU with tiny models, in about a minute (tests/test_gpu_scripts.py does, in
# CI). PARTS="decode train": only those parts. WORK: where the shards and tables go.
# Longer runs of one part each: gpu_decode.sh (256 tokens, 3 timings), gpu_recipe.sh (2 seeds, an lr
# grid), gpu_check.sh (CUDA correctness: validation under --compile, a killed torchrun run resuming).
set -uo pipefail  # (not -e: a failing part must not cost the others' figures)
. tests/gpu_env.sh
WORK=${WORK:-/tmp/gpu_all${DRY:+_dry}}  # (not $OUT, which the device tool sends back: the tables are printed)
PARTS=${PARTS:-decode serve score recipe train fsdp}
mkdir -p "$WORK" && rm -f "$WORK"/*.md
if [ -n "${DRY:-}" ]; then  # the script's logic on a CPU: tiny models, fewer rows and steps
    model=(--n_layer 2 --n_head 2 --n_embd 64) rows=1,4 quick=--quick max_batch=4
    decode=(--decode_device cpu --decode_preset args)
    recipe=(--recipe_layers 1 --recipe_embd 64 --recipe_block 64 --recipe_batch 4 --recipe_steps 4 --quick
            --recipe_val_tokens 1024 --recipe_train_flags="--device cpu")
    train=(--seq_len 64 --batch_size 4 --train_steps 4 --train_flags="--device cpu --no-compile --dtype fp32")
    data=(--max_tokens 1000000)
else
    model=(--n_layer 12 --n_head 12 --n_embd 768) rows=1,16,64 quick="--repeat 1" max_batch=64
    decode=(--decode_preset gpt2)
    recipe=(--recipe_layers 12 --recipe_embd 768 --recipe_block 1024 --recipe_batch 32 --recipe_steps 100
            --recipe_val_tokens 196608 --recipe_train_flags="--device cuda --dtype bf16 --no-compile")
    train=(--seq_len 1024 --batch_size 32 --train_steps 10
           --train_flags="--total_batch_size 524288 --device cuda --dtype bf16 --compile")
    data=()
fi

deadline=${TOTAL:-530} report=() failed=0  # (seconds from the script's start: $SECONDS)
want() { [[ " $PARTS " == *" $1 "* ]]; }
part() {  # part NAME SECONDS COMMAND...: the command in a time box (SIGTERM to its process group, then SIGKILL)
    local name=$1 box=$2 t0=$SECONDS rc
    shift 2
    [ "$box" -gt $((deadline - SECONDS - 5)) ] && box=$((deadline - SECONDS - 5))
    if [ "$box" -lt 1 ]; then
        report+=("$name: NOT RUN, the run's TOTAL of ${TOTAL:-530} s spent") failed=1
        return 1
    fi
    echo "== $name (time box $box s)"
    timeout -k 5 "$box" "$@"
    rc=$?
    case $rc in
        0) report+=("$name: done in $((SECONDS - t0)) s") ;;
        124 | 137) report+=("$name: STOPPED at its time box of $box s") failed=1 ;;
        *) report+=("$name: FAILED (exit $rc) after $((SECONDS - t0)) s") failed=1 ;;
    esac
    return $rc
}
bench() {  # bench NAME SECONDS FLAGS...: bench.py --section NAME in a time box, its table into $WORK/NAME.md
    local name=$1 box=$2
    shift 2
    want "$name" && part "$name" "$box" "$PY" bench.py --section "$name" --markdown "$WORK/$name.md" "$@"
}

bench decode "${TIME_DECODE:-130}" "${model[@]}" "${decode[@]}" --decode_batches $rows --prompt_len 32 \
    --new_tokens 128 $quick
bench serve "${TIME_SERVE:-110}" "${model[@]}" --serve_clients $rows --prompt_len 32 --new_tokens 64 $quick \
    --serve_flags="--max_batch $max_batch --compile --max_requests 128"
bench score "${TIME_SCORE:-45}" "${model[@]}" $quick --serve_flags="--max_batch 16"
if want recipe || want train || want fsdp; then  # the corpus's shards, once for both (fineweb.py resumes a finished set at once)
    part data 60 env TQDM_DISABLE=1 "$PY" fineweb.py --source "$CORPUS" --path "$WORK/data" --shard_size 250000 \
        "${data[@]}"
fi
bench recipe "${TIME_RECIPE:-130}" "${recipe[@]}" --recipe_seeds 1 --recipe_lrs 6e-4 --data "$WORK/data"
bench train "${TIME_TRAIN:-110}" "${model[@]}" "${train[@]}" --data "$WORK/data"
bench fsdp "${TIME_FSDP:-150}" "${model[@]}" "${train[@]}" --train_steps 6 --data "$WORK/data"

echo "== tables for BENCHMARKS.md"
for name in decode serve score recipe train fsdp; do
    [ -f "$WORK/$name.md" ] && echo && cat "$WORK/$name.md"
done
echo "== parts ($SECONDS s in all)"
printf '%s\n' "${report[@]}"
exit $failed
