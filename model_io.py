"""
Getting a GPT-2 in and out of model.py: Hugging Face-format checkpoints (read and written),
the Hub download of OpenAI's weights, train.py run directories, the tokenizer, and where a
script runs by default (device and dtype).

    from model_io import load_model, save_pretrained, get_tokenizer
    model = load_model("gpt2")              # OpenAI's weights (downloads once, online)
    model = load_model("log/small")         # a train.py run: its newest complete checkpoint
    model = load_model("path/to/hf_dir")    # config.json + model.safetensors (or pytorch_model.bin)
    save_pretrained(model, "out")           # transformers.GPT2LMHeadModel.from_pretrained("out") loads it
    enc = get_tokenizer()                   # tiktoken r50k_base == GPT-2's BPE

Every failure to load is a cli.Error whose message says what to do.
"""

import codecs
import functools
import json
import os
import urllib.error
import urllib.request
from dataclasses import asdict

import torch

import cli
from model import EOT_TOKEN, GPT, PRESETS, GPTConfig

# -----------------------------------------------------------------------------
# Where a script runs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # the scripts' --dtype


def best_device():
    """What --device defaults to in every script: cuda, else mps, else cpu."""
    return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"


def default_dtype(device):
    """What --dtype defaults to in every script: bf16 on a CUDA device that has it, else fp32."""
    return "bf16" if str(device).startswith("cuda") and torch.cuda.is_bf16_supported() else "fp32"


# -----------------------------------------------------------------------------
# The tokenizer

# tiktoken caches each encoding's file under the sha1 of its URL; this is r50k_base's.
R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"

# A chat model's two markers (chat.py's ChatML template), in rows of the padded embedding that
# pretraining never uses: its vocabulary is GPT-2's 50,257 tokens and these two.
IM_START, IM_END = 50257, 50258
CHAT_VOCAB_SIZE = 50259


@functools.lru_cache(maxsize=None)
def get_tokenizer(chat=False):
    """The GPT-2 BPE (tiktoken's r50k_base, byte-identical to 'gpt2'); chat=True adds the chat
    markers <|im_start|> and <|im_end|> as special tokens (to decode a chat model's output).
    Downloads once on a connected machine; offline it is read from $TIKTOKEN_CACHE_DIR."""
    import hashlib

    import tiktoken

    if chat:
        base = get_tokenizer()
        return tiktoken.Encoding(name="r50k_base_chatml", pat_str=base._pat_str, mergeable_ranks=base._mergeable_ranks,
                                 special_tokens={**base._special_tokens, "<|im_start|>": IM_START, "<|im_end|>": IM_END})
    try:
        return tiktoken.get_encoding("r50k_base")
    except Exception as e:
        cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
        name = hashlib.sha1(R50K_URL.encode()).hexdigest()
        where = (f"{os.path.join(cache, name)} is missing or unreadable" if cache else
                 "TIKTOKEN_CACHE_DIR is not set")
        raise cli.Error(
            f"cannot load the GPT-2 tokenizer (tiktoken r50k_base: {type(e).__name__}): {where}. Offline, set "
            f"TIKTOKEN_CACHE_DIR to a directory holding {R50K_URL} saved under the name {name} "
            "(this repo's ../shared/tiktoken_cache has it)"
        ) from None


class TextStream:
    """Token bytes to text deltas as they come. A character's UTF-8 bytes may be split across tokens:
    an incremental decoder holds them back until it is complete, and text that may be the start of a
    stop string is held back too; a stop string itself is never handed out. The deltas add up to
    tiktoken's decode() of the tokens, cut before the first stop string."""

    def __init__(self, stop=()):
        self.stop = stop
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text, self.sent = "", 0  # everything decoded; how much of it was handed out

    def push(self, data, final=False):
        """Add bytes (final: the last of them; a trailing incomplete character becomes U+FFFD, as in
        decode()); returns (text safe to hand out now, stopped)."""
        self.text += self.decoder.decode(data, final)
        # A stop string cannot start before self.sent: any text that could begin one was held.
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        if hits:
            end = min(hits)
        else:
            held = 0 if final else max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
            end = max(self.sent, len(self.text) - held)
        delta, self.sent = self.text[self.sent : end], end
        return delta, bool(hits)


# -----------------------------------------------------------------------------
# Hugging Face layout: GPT2LMHeadModel's names, Conv1D orientation, no padding rows

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def hf_state_dict(model):
    """model's weights in GPT2LMHeadModel's layout (no padding rows, Conv1D orientation), on the CPU."""
    out = {}
    for k, v in model.state_dict().items():
        v = v.detach()
        if k == "transformer.wte.weight":
            v = v[: model.config.vocab_size]
        elif k.endswith(_CONV1D):
            v = v.t()
        out[k] = v.contiguous().cpu()
    return out


def load_hf_state_dict(model, sd):
    """Copy a Hugging Face GPT-2 state dict (with or without the 'transformer.' prefix) into model."""
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    # attention-mask buffers of old checkpoints; lm_head is tied to wte
    sd = {k: v for k, v in sd.items() if not k.endswith((".attn.bias", ".attn.masked_bias")) and k != "lm_head.weight"}
    ours = {k.removeprefix("transformer."): v for k, v in model.state_dict().items()}
    missing, unexpected = sorted(ours.keys() - sd.keys()), sorted(sd.keys() - ours.keys())
    if missing or unexpected:
        raise cli.Error(f"state dict does not match GPT-2 {model.config}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    V = model.config.vocab_size
    with torch.no_grad():
        for k, v in sd.items():
            if k.endswith(_CONV1D):
                v = v.t()  # HF's Conv1D stores (in, out); nn.Linear is (out, in)
            target = ours[k][:V] if k == "wte.weight" else ours[k]
            if target.shape != v.shape:
                raise cli.Error(f"{k}: shape {tuple(v.shape)} in checkpoint, {tuple(target.shape)} expected")
            target.copy_(v)


def hf_config(model):
    """config.json for model, as transformers.GPT2Config writes it."""
    c = model.config
    eos = EOT_TOKEN if c.vocab_size > EOT_TOKEN else None
    chat = {"chat_format": "chatml", "eos_token_id": IM_END} if c.vocab_size == CHAT_VOCAB_SIZE else {}
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "activation_function": "gelu_new", "n_positions": c.block_size, "n_ctx": c.block_size,
        "vocab_size": c.vocab_size, "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd,
        "layer_norm_epsilon": c.layer_norm_epsilon, "initializer_range": 0.02,
        "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0,  # we train without dropout
        "bos_token_id": eos, "eos_token_id": eos, "tie_word_embeddings": True,
        "scale_attn_weights": True, "torch_dtype": "float32", **chat,
    }


def save_pretrained(model, save_dir):
    """Write config.json + model.safetensors (fp32) that transformers.GPT2LMHeadModel.from_pretrained
    loads as is. Each file is written whole or not at all (cli.atomic_write)."""
    from safetensors.torch import save_file

    os.makedirs(save_dir, exist_ok=True)
    weights = {k: v.float() for k, v in hf_state_dict(model).items()}

    def write_weights(path):
        try:
            save_file(weights, path, metadata={"format": "pt"})
        except OSError:
            raise
        except Exception as e:  # safetensors reports I/O errors (a full disk) as its own SafetensorError
            raise OSError(f"cannot write {path}: {e}") from None

    cli.atomic_write(os.path.join(save_dir, "model.safetensors"), write_weights)
    text = json.dumps({**hf_config(model), "gpt2_repro": asdict(model.config)}, indent=2)
    cli.atomic_write(os.path.join(save_dir, "config.json"), text)


# -----------------------------------------------------------------------------
# Loading: a directory, a run, or a Hub name


def checkpoint_dirs(run_dir, required=("config.json", "model.safetensors")):
    """The step_NNNNNN/ directories of a train.py run that hold every required file, oldest first."""
    if not os.path.isdir(run_dir):
        return []
    found = [d for d in os.listdir(run_dir) if d.startswith("step_") and d[5:].isdigit()
             and all(os.path.isfile(os.path.join(run_dir, d, f)) for f in required)]
    return [os.path.join(run_dir, d) for d in sorted(found, key=lambda d: int(d[5:]))]


def load_model(spec, cache_dir=None):
    """The one place every script resolves --model: a Hugging Face-format directory
    (config.json + weights), a train.py run directory (its newest complete step_NNNNNN/
    checkpoint), or an OpenAI GPT-2 name (gpt2, gpt2-medium, gpt2-large, gpt2-xl), which
    downloads once into cache_dir (default $GPT2_REPRO_CACHE or ~/.cache/gpt2-repro)."""
    path = os.fspath(spec)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        steps = checkpoint_dirs(path)
        if not steps:
            raise cli.Error(f"{path} holds neither config.json nor complete step_NNNNNN/ checkpoints")
        path = steps[-1]
    elif not os.path.isdir(path):
        if path not in PRESETS:
            raise cli.Error(f"--model {path!r}: no such directory, and not one of {', '.join(PRESETS)}")
        path = download(path, cache_dir)
    config_file = os.path.join(path, "config.json")
    try:
        with open(config_file) as f:
            hf = json.load(f)
    except (OSError, ValueError) as e:
        raise cli.Error(f"cannot read {config_file}: {e}") from None
    if not isinstance(hf, dict):
        raise cli.Error(f"{config_file}: not a JSON object")
    if hf.get("model_type", "gpt2") != "gpt2":
        raise cli.Error(f"{config_file}: model_type {hf.get('model_type')!r} is not gpt2")
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise cli.Error(f"{config_file}: activation {hf['activation_function']!r} is not GPT-2's tanh GELU")
    try:
        config = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                           n_head=hf["n_head"], n_embd=hf["n_embd"],
                           layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5))
    except KeyError as e:
        raise cli.Error(f"{config_file}: no {e.args[0]!r} field") from None
    except ValueError as e:
        raise cli.Error(f"{config_file}: {e}") from None
    model = GPT(config)
    load_hf_state_dict(model, read_weights(path))
    return model


def read_weights(path):
    """The state dict in directory path: model.safetensors, else pytorch_model.bin (tensors only)."""
    st, bin_ = os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin")
    try:
        if os.path.isfile(st):
            from safetensors.torch import load_file
            return load_file(st)
        if os.path.isfile(bin_):
            return torch.load(bin_, map_location="cpu", weights_only=True)  # never unpickle code
    except Exception as e:  # corrupt or truncated file
        raise cli.Error(f"cannot read weights in {path}: {e}") from None
    raise cli.Error(f"no model.safetensors or pytorch_model.bin in {path}")


def download(name, cache_dir=None):
    """Fetch config.json and model.safetensors of an OpenAI GPT-2 from the Hugging Face Hub
    (once: later calls find them in cache_dir); returns the directory."""
    cache_dir = cache_dir or os.environ.get("GPT2_REPRO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gpt2-repro")
    target = os.path.join(cache_dir, name)
    os.makedirs(target, exist_ok=True)
    base = f"https://huggingface.co/openai-community/{name}/resolve/main/"
    for fname in ("config.json", "model.safetensors"):
        dest = os.path.join(target, fname)
        if os.path.isfile(dest):
            continue
        try:
            cli.atomic_write(dest, lambda p: fetch(base + fname, p))
        except (urllib.error.URLError, OSError) as e:
            raise cli.Error(
                f"could not download {name!r} from the Hugging Face Hub ({e}). Offline? On a machine with "
                f"internet, download config.json and model.safetensors from https://huggingface.co/openai-community/{name} "
                f"into a directory, copy it here, and pass that directory instead of {name!r} "
                f"(e.g. load_model('path/to/{name}') or --model path/to/{name})."
            ) from None
    return target


def fetch(url, path):
    """Download url to path with a progress bar."""
    from tqdm import tqdm

    with tqdm(unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1]) as bar:
        def hook(blocks, block_size, total):
            bar.total = total if total > 0 else None
            bar.update(blocks * block_size - bar.n)

        urllib.request.urlretrieve(url, path, reporthook=hook)
