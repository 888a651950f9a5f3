"""
Getting a GPT-2 in and out of model.py: Hugging Face-format checkpoints (read and written),
the Hub download of OpenAI's weights, train.py run directories, the tokenizer, and where a
script runs by default (device and dtype).

    from model_io import load_model, save_pretrained, get_tokenizer
    model = load_model("gpt2")              # OpenAI's weights (downloads once, online)
    model = load_model("log/small")         # a train.py run: its newest complete checkpoint
    model = load_model("path/to/hf_dir")    # config.json + model.safetensors (or pytorch_model.bin)
    save_pretrained(model, "out")           # transformers loads it as is: model, tokenizer, generation config
    enc = get_tokenizer()                   # tiktoken r50k_base == GPT-2's BPE

    python model_io.py export log/small out/small [--dtype bf16]   # a folder for the Hub, with a model card

Every directory written here is whole for transformers: AutoTokenizer, pipeline("text-generation")
and lm_eval --model hf read it without the Hub (tokenizer files built offline from tiktoken's BPE
by hf_tokenizer.py; a chat model's carries its chat_template and stops at <|im_end|>). Every failure
to load is a cli.Error whose message says what to do.
"""

import codecs
import functools
import json
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import asdict

import torch

import cli
from hf_tokenizer import CHAT_TEMPLATE, FILES_VERSION, build_files
from model import BLOCK_MATRICES, EOT_TOKEN, GPT, PRESETS, GPTConfig
from runtime import DTYPES

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
        markers = {"<|im_start|>": IM_START, "<|im_end|>": IM_END}
        return tiktoken.Encoding(name="r50k_base_chatml", pat_str=base._pat_str, mergeable_ranks=base._mergeable_ranks,
                                 special_tokens={**base._special_tokens, **markers})
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
            held = 0 if final else max((k for s in self.stop for k in range(1, len(s))
                                        if self.text.endswith(s[:k])), default=0)
            end = max(self.sent, len(self.text) - held)
        delta, self.sent = self.text[self.sent : end], end
        return delta, bool(hits)


# -----------------------------------------------------------------------------
# The tokenizer as transformers reads it, beside every checkpoint (AutoTokenizer.from_pretrained)

SPECIAL = {"<|endoftext|>": EOT_TOKEN, "<|im_start|>": IM_START, "<|im_end|>": IM_END}


def cache_root():
    """Where downloads and built files are kept: $GPT2_REPRO_CACHE, else ~/.cache/gpt2-repro."""
    return os.environ.get("GPT2_REPRO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gpt2-repro")


@functools.lru_cache(maxsize=None)
def specials(chat):
    """{text: id} of the special tokens a model's tokenizer has: <|endoftext|>, and a chat model's markers."""
    return {k: v for k, v in SPECIAL.items() if chat or v == EOT_TOKEN}


def tokenizer_files(chat=False):
    """{name: bytes} of tokenizer.json, vocab.json and merges.txt: GPT-2's BPE (chat=True: with the chat
    markers as special tokens) as transformers reads it, built from tiktoken's ranks. Built once per
    machine (kept under cache_root()), read once per process: a checkpoint only copies them."""
    cache = os.path.join(cache_root(), f"hf-tokenizer-v{FILES_VERSION}", "chatml" if chat else "gpt2")
    names = ("tokenizer.json", "vocab.json", "merges.txt")
    try:
        files = {}
        for name in names:
            with open(os.path.join(cache, name), "rb") as f:
                files[name] = f.read()
        return files
    except OSError:
        pass
    files = build_files(get_tokenizer()._mergeable_ranks, specials(chat), chat)
    try:
        os.makedirs(cache, exist_ok=True)
        for name in names:
            cli.atomic_write(os.path.join(cache, name), files[name], fsync=False)
    except OSError:
        pass  # a read-only home: each process builds them again
    return files


def hf_extra_files(model):
    """{name: bytes} written beside a model's weights and config.json so that transformers has all it
    needs: the tokenizer (tokenizer_files, tokenizer_config.json: model_max_length, the special tokens,
    a chat model's chat_template) and generation_config.json (the token that ends generation). Nothing
    for a model whose vocabulary is not GPT-2's (or a chat model's); without the BPE, a warning and nothing."""
    c = model.config
    chat = c.vocab_size == CHAT_VOCAB_SIZE
    if c.vocab_size != EOT_TOKEN + 1 and not chat:
        return {}
    try:
        files = dict(tokenizer_files(chat))
    except cli.Error as e:  # no BPE here: the checkpoint is still whole for this project's scripts
        warn_once(f"warning: no tokenizer files written beside the model ({e})")
        return {}
    eos = "<|im_end|>" if chat else "<|endoftext|>"
    added = specials(chat)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # tokenizer.json as written (GPT2Tokenizer rebuilds its own)
        "model_max_length": c.block_size,
        "bos_token": "<|endoftext|>", "eos_token": eos, "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "add_bos_token": False, "add_eos_token": False, "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,  # decode() gives the text back as it was
        "errors": "replace",
        "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True} for t, i in added.items()},
    }
    if chat:
        config["additional_special_tokens"] = ["<|im_start|>", "<|im_end|>"]
        config["chat_template"] = CHAT_TEMPLATE
    files["tokenizer_config.json"] = json.dumps(config, indent=2, ensure_ascii=False).encode()
    generation = {"bos_token_id": EOT_TOKEN, "eos_token_id": SPECIAL[eos], "pad_token_id": EOT_TOKEN}
    files["generation_config.json"] = json.dumps(generation, indent=2).encode()
    return files


@functools.lru_cache(maxsize=None)
def warn_once(message):
    print(message, file=sys.stderr)


# -----------------------------------------------------------------------------
# Hugging Face layout: GPT2LMHeadModel's names, Conv1D orientation, no padding rows


def hf_state_dict(model):
    """model's weights in GPT2LMHeadModel's layout (no padding rows, Conv1D orientation), on the CPU."""
    out = {}
    for k, v in model.state_dict().items():
        v = v.detach()
        if k == "transformer.wte.weight":
            v = v[: model.config.vocab_size]
        elif k.endswith(BLOCK_MATRICES):
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
        raise cli.Error(f"state dict does not match GPT-2 {model.config}: missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}")
    V = model.config.vocab_size
    with torch.no_grad():
        for k, v in sd.items():
            if k.endswith(BLOCK_MATRICES):
                v = v.t()  # HF's Conv1D stores (in, out); nn.Linear is (out, in)
            target = ours[k][:V] if k == "wte.weight" else ours[k]
            if target.shape != v.shape:
                raise cli.Error(f"{k}: shape {tuple(v.shape)} in checkpoint, {tuple(target.shape)} expected")
            target.copy_(v)


def hf_config(model, dtype="fp32"):
    """config.json for model, as transformers.GPT2Config writes it (dtype: the weights' --dtype)."""
    c = model.config
    eos = EOT_TOKEN if c.vocab_size > EOT_TOKEN else None
    chat = {"chat_format": "chatml", "eos_token_id": IM_END} if c.vocab_size == CHAT_VOCAB_SIZE else {}
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "activation_function": "gelu_new", "n_positions": c.block_size, "n_ctx": c.block_size,
        "vocab_size": c.vocab_size, "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd,
        "layer_norm_epsilon": c.layer_norm_epsilon, "initializer_range": 0.02,
        "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0,  # we train without dropout
        "bos_token_id": eos, "eos_token_id": eos, "pad_token_id": None, "tie_word_embeddings": True,
        "scale_attn_weights": True, "dtype": str(DTYPES[dtype]).removeprefix("torch."), **chat,
    }


def save_pretrained(model, save_dir, dtype="fp32"):
    """Write a directory that transformers loads as is, model and tokenizer: config.json,
    model.safetensors (fp32, or --dtype), and for a model with GPT-2's vocabulary (or a chat model's)
    the tokenizer files and generation_config.json (hf_extra_files). Each file is written whole or
    not at all (cli.atomic_write)."""
    from safetensors.torch import save_file

    os.makedirs(save_dir, exist_ok=True)
    weights = {k: v.to(DTYPES[dtype]) for k, v in hf_state_dict(model).items()}

    def write_weights(path):
        try:
            save_file(weights, path, metadata={"format": "pt"})
        except OSError:
            raise
        except Exception as e:  # safetensors reports I/O errors (a full disk) as its own SafetensorError
            raise OSError(f"cannot write {path}: {e}") from None

    cli.atomic_write(os.path.join(save_dir, "model.safetensors"), write_weights)
    text = json.dumps({**hf_config(model, dtype), "gpt2_repro": asdict(model.config)}, indent=2)
    cli.atomic_write(os.path.join(save_dir, "config.json"), text)
    for name, data in hf_extra_files(model).items():
        cli.atomic_write(os.path.join(save_dir, name), data)


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
    cache_dir = cache_dir or cache_root()
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
                "internet, download config.json and model.safetensors from "
                f"https://huggingface.co/openai-community/{name} into a directory, copy it here, and pass that "
                f"directory instead of {name!r} (e.g. load_model('path/to/{name}') or --model path/to/{name})."
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


# -----------------------------------------------------------------------------
# Export: a folder to share (the Hugging Face Hub), with a model card


def _source(spec):
    """(the checkpoint or model load_model(spec) loads, the train.py/sft.py run it is of or None)."""
    path = os.fspath(spec)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        steps = checkpoint_dirs(path)
        return (steps[-1] if steps else path), path
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) and os.path.basename(os.path.abspath(path)).startswith("step_"):
        return path, parent
    return path, None


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def run_figures(run_dir, step):
    """What a model card says of the run in run_dir up to checkpoint `step`: run.json's settings and,
    from log.jsonl, the recipe and the newest val loss and HellaSwag scores at or before `step` (a
    step logged twice, after a resume, counts as its last line says). None where run.json is missing."""
    run = _read_json(os.path.join(run_dir, "run.json"))
    if not isinstance(run, dict) or not isinstance(run.get("settings"), dict):
        return None
    latest = {}  # key -> (step, record)
    log_path = os.path.join(run_dir, "log.jsonl")
    if os.path.isfile(log_path):
        for _, r in cli.read_jsonl(log_path):
            if isinstance(r, dict) and isinstance(r.get("step"), int) and r["step"] <= step:
                for key in ("recipe", "val_loss", "hellaswag_acc_norm"):
                    if key in r and r["step"] >= latest.get(key, (-1,))[0]:
                        latest[key] = (r["step"], r)
    return {"settings": run["settings"], "step": step, **{k: r for k, (_, r) in latest.items()}}


def model_card(model, name, figures=None, dtype="fp32"):
    """README.md of an exported model: the Hub's YAML front matter, what the model is, the run's
    figures (run_figures) and how to load it with transformers."""
    c, chat = model.config, model.config.vocab_size == CHAT_VOCAB_SIZE
    tags = ["gpt2", "text-generation"] + (["chatml", "conversational"] if chat else [])
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags:", *[f"- {t}" for t in tags],
             "---", "", f"# {name}", ""]
    kind = "A chat model (fine-tuned with sft.py, ChatML template)" if chat else "A GPT-2 language model"
    lines += [f"{kind}: {c.n_layer} layers, {c.n_head} heads, {c.n_embd} wide, {c.block_size} tokens of context, "
              f"{model.num_params():,} parameters ({str(DTYPES[dtype]).removeprefix('torch.')} weights), "
              "GPT-2's tokenizer"
              + (" and the markers <|im_start|> and <|im_end|>." if chat else "."), ""]
    if figures:
        s, step = figures["settings"], figures["step"]
        rows = []
        if s.get("task") == "sft":  # (a local directory by its name only: the card is for sharing)
            init = str(s.get("init_model"))
            if os.path.isabs(init):
                head, tail = os.path.split(init.rstrip("/"))
                init = os.path.join(os.path.basename(head), tail) if tail.startswith("step_") else tail
            rows.append(("fine-tuned from", f"`{init}`"))
        if "recipe" in figures:
            recipe = figures["recipe"]["recipe"]
            rows.append(("recipe", f"{recipe.get('name')}: " + ", ".join(
                f"{k} {v}" for k, v in recipe.items() if k != "name" and v is not None)))
        total = s.get("max_steps")
        rows.append(("steps", f"{step:,} of {total:,}" if isinstance(total, int) else f"{step:,}"))
        if isinstance(s.get("total_batch_size"), int):
            per_step = (f"{s['conversations_per_step']:,} conversations in rows of {c.block_size} tokens, padding "
                        "included" if isinstance(s.get("conversations_per_step"), int) else
                        f"{s['total_batch_size']:,} tokens")
            rows.append(("tokens trained", f"{step * s['total_batch_size']:,} ({step:,} steps of {per_step})"))
        rows.append(("trained in", s.get("dtype", "?")))
        if "val_loss" in figures:
            r = figures["val_loss"]
            held_out = (f"{r.get('val_tokens', 0) // c.block_size:,} held-out conversations" if s.get("task") == "sft"
                        else f"{r.get('val_tokens', 0):,} held-out tokens")
            rows.append(("val loss", f"{r['val_loss']:.4f} (at step {r['step']:,}, on {held_out})"))
        if "hellaswag_acc_norm" in figures:
            r = figures["hellaswag_acc_norm"]
            rows.append(("HellaSwag acc_norm", f"{r['hellaswag_acc_norm']:.4f} (at step {r['step']:,}, "
                         f"{r.get('hellaswag_n', 0):,} examples)"))
        elif s.get("task") != "sft":
            rows.append(("HellaSwag acc_norm", "not measured"))
        lines += ["## Training", "", "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]
    lines += ["## Use", "", f"With transformers, from this folder or from the Hub (`OWNER/{name}`):", "", "```python"]
    if chat:
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'tokenizer = AutoTokenizer.from_pretrained({json.dumps(name)})',
                  f'model = AutoModelForCausalLM.from_pretrained({json.dumps(name)})',
                  'messages = [{"role": "user", "content": "Hello! What can you do?"}]',
                  "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, "
                  'return_tensors="pt")',
                  f"out = model.generate(**inputs, max_new_tokens={min(64, c.block_size // 2)})  # stops at <|im_end|>",
                  'print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))']
    else:
        lines += ["from transformers import pipeline", "",
                  f'generator = pipeline("text-generation", model={json.dumps(name)})',
                  f'print(generator("Hello, I\'m a language model,", max_new_tokens={min(30, c.block_size // 2)})'
                  '[0]["generated_text"])']
    lines += ["```", ""]
    return "\n".join(lines)


def export(spec, out_dir, dtype="fp32"):
    """Write out_dir, a folder to share: what load_model(spec) loads, in transformers' layout
    (config.json, model.safetensors in dtype, tokenizer files, generation_config.json) and a model
    card (README.md), never trainer state. out_dir must not exist or be empty; it is written whole
    or not at all (into a temporary directory beside it, then renamed)."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not (os.path.isdir(out_dir) and not os.listdir(out_dir)):
        raise cli.Error(f"{out_dir} exists and is not an empty directory: the export never overwrites; "
                        "pass a new directory")
    if not os.path.isdir(spec) and spec not in PRESETS:
        raise cli.Error(f"{spec}: no such directory (a train.py or sft.py run, a step_NNNNNN/ or HF-format directory)")
    checkpoint, run_dir = _source(spec)
    model = load_model(checkpoint)
    if model.config.vocab_size not in (EOT_TOKEN + 1, CHAT_VOCAB_SIZE):
        raise cli.Error(f"{spec}: a vocabulary of {model.config.vocab_size} tokens is not GPT-2's: "
                        "no tokenizer to export with it")
    figures = None
    step = os.path.basename(os.path.abspath(checkpoint))[5:]
    if run_dir and step.isdigit():
        figures = run_figures(run_dir, int(step))
        run_id = (_read_json(os.path.join(checkpoint, "checkpoint.json")) or {}).get("run_id")
        if figures and run_id and run_id != (_read_json(os.path.join(run_dir, "run.json")) or {}).get("run_id"):
            figures = None  # a checkpoint of another run: its figures are not in this log
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".tmp-{os.path.basename(out_dir)}-")
    try:
        save_pretrained(model, tmp, dtype)
        if not os.path.isfile(os.path.join(tmp, "tokenizer.json")):
            raise cli.Error("cannot export without GPT-2's tokenizer (see the warning above)")
        cli.atomic_write(os.path.join(tmp, "README.md"), model_card(model, os.path.basename(out_dir), figures, dtype))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's is 0700
        cli.sync(tmp)
        os.rename(tmp, out_dir)  # replaces an empty directory; fails if one has appeared meanwhile
        cli.sync(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def main(argv=None):
    p = cli.Parser(description="Hugging Face-format models: `export` writes a folder to share on the Hub.")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="write a Hub-ready folder (weights, config, tokenizer, model card)",
                       description="Write OUT_DIR: the model in transformers' layout (config.json, model.safetensors, "
                       "tokenizer files, generation_config.json) and a model card (README.md) with the run's recipe, "
                       "tokens, val loss and HellaSwag score from its log.jsonl; no trainer state. OUT_DIR must be new "
                       "(or empty); it appears whole or not at all.")
    e.add_argument("model", metavar="RUN_OR_CHECKPOINT",
                   help="a train.py or sft.py run (its newest checkpoint), a step_NNNNNN/ or HF-format directory")
    e.add_argument("out_dir", metavar="OUT_DIR", help="the folder to write (must not exist, or be empty)")
    e.add_argument("--dtype", choices=DTYPES, default="fp32", help="the weights' precision")
    args = p.parse_args(argv)
    try:
        out = export(args.model, args.out_dir, args.dtype)
    except cli.Error as err:
        return cli.fail(err)
    except OSError as err:  # a full disk, a directory that cannot be made, one filled meanwhile
        return cli.fail(f"cannot write {args.out_dir}: {err.strerror or err}")
    print(f"exported {args.model} to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
