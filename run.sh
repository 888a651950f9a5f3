#!/usr/bin/env bash
# One entry point, each mode doing its own set-up into ./.venv:
#   ./run.sh          the main job, end to end on a small default
#   ./run.sh test     the test suite (what CI runs)
#   ./run.sh bench    the benchmarks (bench.py), printed as ratios
#   ./run.sh sample-command   print the command that samples from the main job's model (no set-up)
#   ./run.sh chat-command     print the command that chats with the main job's chat model (no set-up)
set -euo pipefail
cd "$(dirname "$0")"
mode="${1:-main}"
PY=.venv/bin/python

# The GPT-2 tokenizer downloads once; offline machines use a cache beside the project.
if [ -z "${TIKTOKEN_CACHE_DIR:-}" ] && [ -d ../shared/tiktoken_cache ]; then
    export TIKTOKEN_CACHE_DIR="$(cd ../shared/tiktoken_cache && pwd)"
fi

# The commands that sample from and chat with the main job's models, as the main job prints them: they
# work pasted into a fresh shell here, for they name the venv's python and the tokenizer cache.
# (tests/test_run_sh.py runs exactly what this prints.)
env_prefix() {
    [ -n "${TIKTOKEN_CACHE_DIR:-}" ] && printf 'TIKTOKEN_CACHE_DIR=%q ' "$TIKTOKEN_CACHE_DIR"
    return 0
}
sample_command() {
    echo "$(env_prefix)$PY generate.py --model log/small --prompt \"Hello, I'm a language model,\" --num_samples 3"
}
chat_command() {
    echo "$(env_prefix)$PY generate.py --chat --model log/small-chat"
}
if [ "$mode" = sample-command ]; then
    sample_command
    exit 0
fi
if [ "$mode" = chat-command ]; then
    chat_command
    exit 0
fi

# --- set-up: a local virtual environment with pinned torch, then the requirements ----------
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# torch==2.13.0: a CPU wheel where one lies on local disk (our CI), a CUDA build from PyPI on Linux
# GPU machines. Set TORCH_SPEC to install another build (e.g. TORCH_SPEC="torch==2.13.0+cu126").
if ! $PY -c "import torch" 2>/dev/null; then
    $PY -m pip install -q --upgrade pip
    $PY -m pip install -q ${TORCH_SPEC:-torch==2.13.0}
fi
reqs=requirements.txt
[ "$mode" = main ] || reqs=requirements-test.txt
# (grep drops the pip warnings about this machine's unused local package index)
$PY -m pip install -q -r "$reqs" 2> >(grep -v "^WARNING: Location" >&2)
# HellaSwag's data, when it lies beside the project (else hellaswag.py downloads it)
if [ -z "${HELLASWAG_DIR:-}" ] && [ -d ../shared/hellaswag ]; then
    export HELLASWAG_DIR="$PWD/../shared/hellaswag"
fi

# --- the modes ------------------------------------------------------------------------------
case "$mode" in
main)
    # 1. a small dataset: the local corpus beside the project if there is one (offline CI and
    #    development machines), else the first 2M tokens of FineWebEdu, streamed (an unreachable
    #    Hub is one error line at once, and leaves no data/small behind)
    if [ -d ../shared/corpus ]; then
        $PY fineweb.py --source ../shared/corpus --path data/small --shard_size 1_000_000
    else
        $PY fineweb.py --path data/small --max_tokens 2_000_000 --shard_size 1_000_000 || {
            status=$?
            echo "(run.sh streams FineWebEdu when no ../shared/corpus lies beside the project: offline, put" \
                 "text there, one document per .txt file, and run it again)" >&2
            exit $status
        }
    fi
    # 2. train a tiny GPT-2 (4 layers, 128 wide, 128 tokens of context) for a few minutes on the
    #    CPU; --resume makes a second run continue (or do nothing if finished). Validation loss,
    #    HellaSwag (when its data can be had) and a sample are printed every 40 steps; everything
    #    lands in log/small/.
    $PY train.py --path data/small --log_dir log/small --resume \
        --n_layer 4 --n_head 4 --n_embd 128 --block_size 128 \
        --batch_size_per_device 8 --total_batch_size 1024 --max_steps 80 --warmup_steps 10 \
        --max_lr 3e-3 --min_lr 3e-4 --eval_step_interval 40 --val_tokens 10240 --save_step 40 \
        --hellaswag_examples 100 --sample_tokens 32 --seed 1337
    # 3. HellaSwag on the final checkpoint, when its data could be had
    if grep -q hellaswag_acc_norm log/small/log.jsonl; then
        $PY hellaswag.py --model log/small --limit 200 || echo "(HellaSwag skipped)"
    else
        echo "(HellaSwag skipped: its data could not be had; offline, set HELLASWAG_DIR to a copy of it)"
    fi
    # 4. fine-tune it into a small chat model on the example conversations (README: chat)
    $PY sft.py --model log/small --data examples/chats.jsonl --log_dir log/small-chat --resume \
        --max_steps 60 --conversations_per_step 8 --max_lr 3e-3 --eval_step_interval 30 --save_step 60 \
        --val_frac 0.1 --sample_tokens 24 --seed 1337
    # 5. the results: benchmark.ipynb executed headless on the run; its figures (loss.png,
    #    hellaswag.png) and the executed notebook land beside the log. A failure here is
    #    reported; the run itself is kept.
    if LOG_DIR=log/small $PY -m jupyter nbconvert --to notebook --execute benchmark.ipynb \
            --output-dir log/small --log-level WARN --KernelManager.transport=ipc; then
        $PY -c "import nbformat; print(''.join(o.get('text', '') for o in nbformat.read('log/small/benchmark.ipynb', 4).cells[-1].outputs))"
        echo "results: log/small/benchmark.ipynb (figures and this summary), $(echo log/small/*.png)"
    else
        echo "(rendering benchmark.ipynb failed: see above; the run is in log/small/)"
    fi
    echo "sample from it: $(sample_command)"
    echo "chat with it:   $(chat_command)"
    echo "main job done in $((SECONDS / 60))m$(printf %02d $((SECONDS % 60)))s"
    ;;
test)
    shift || true
    # two workers, each test file whole in one (its module fixtures made once); `-n 0`: one process
    $PY -m pytest tests -q -n 2 --dist loadfile "$@"
    ;;
bench)
    shift || true
    $PY bench.py "$@"
    ;;
*)
    echo "usage: ./run.sh [main|test|bench|sample-command|chat-command] [args...]" >&2
    exit 2
    ;;
esac
