# What the tests/gpu_*.sh scripts need on a lent GPU machine, which has PyTorch, transformers and
# httpx but no network, no ../shared beside the repo and no fastapi/uvicorn:
#   here, first:  bash tests/gpu_env.sh prepare   (into the git-ignored .cache/: the GPT-2 BPE, the
#                 text corpus and serve.py's wheels for Python 3.12; about 17 MB)
#   there:        bash tests/gpu_all.sh (or gpu_decode.sh, gpu_check.sh, gpu_recipe.sh), carrying .cache
# The scripts source this file; it points them at .cache/ where it is there, at ../shared otherwise.
PY=${PY:-python3}
if [ "${1:-}" = prepare ]; then
    mkdir -p .cache/wheels && cp -r ../shared/tiktoken_cache ../shared/corpus .cache/ || exit 1
    exec "$PY" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp -d .cache/wheels \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 fastapi uvicorn
fi
export PYTHONUNBUFFERED=1  # (a run stopped at its time limit still shows what it printed)
for bpe in .cache/tiktoken_cache ../shared/tiktoken_cache; do
    [ -z "${TIKTOKEN_CACHE_DIR:-}" ] && [ -d $bpe ] && export TIKTOKEN_CACHE_DIR=$PWD/$bpe
done
CORPUS=${CORPUS:-$([ -d .cache/corpus ] && echo .cache/corpus || echo ../shared/corpus)}
if [ -d .cache/wheels ] && ! $PY -c "import fastapi, uvicorn" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/serve-site .cache/wheels/*.whl &&
        export PYTHONPATH=/tmp/serve-site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"
$PY -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.is_available())"
