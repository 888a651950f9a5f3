"""Checkpoints and exports are whole for transformers (#26): the tokenizer files (AutoTokenizer encodes
as tiktoken does), a chat model's chat_template (chat.render's tokens), generation_config.json (a chat
model stops at <|im_end|>), pipeline("text-generation") == model.generate; `model_io.py export`: a
folder for the Hub with a model card of the run's log.jsonl figures, no trainer state, never written
over an existing folder."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, T, base_args, check_ok, env, error_line, read_log, run_train
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, pipeline

import chat
import cli
import model_io
from model import GPT, GPTConfig
from model_io import CHAT_VOCAB_SIZE, EOT_TOKEN, IM_END, IM_START, get_tokenizer, load_model

SFT = str(REPO_ROOT / "sft.py")
HELLASWAG = [{"ctx": f"A man walks {n} dogs in the park and", "endings": ["runs.", "sits down on a bench.",
              "eats a sandwich very slowly.", "waves."], "label": n % 4} for n in range(4)]
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "generation_config.json"}
# text the BPE's pre-tokenizer splits in every way it can: words with 's 'll, numbers, runs of spaces,
# tabs and newlines (at the end too), CRLF, accents, CJK, emoji with a modifier
TRICKY = (" Héllo wörld, it's 2024 and we'll see 1234567.89 items!!  Two  spaces,\tthree\t\t\ttabs\r\n"
          "CRLF line\n\n\n   indented\n日本語のテキスト 🤖👍🏽 (parens) [brackets] {braces} x=y+z; ~/.cache   \n  ")
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?\n\nOne more line."}],
    [{"role": "developer", "content": "Answer in French."}, {"role": "user", "content": "Hello"}],
    [{"role": "user", "content": [{"type": "text", "text": "two"}, {"type": "text", "text": " parts"}]}],
    # text starting with white space: chat.render encodes it apart from the "user\n" before it
    [{"role": "system", "content": "  indented"}, {"role": "user", "content": "\n\nblank lines first"},
     {"role": "assistant", "content": " a space"}, {"role": "user", "content": ""}],
]


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    """Build the tokenizer files here (the first checkpoint writes them), not under ~/.cache."""
    old = os.environ.get("GPT2_REPRO_CACHE")
    os.environ["GPT2_REPRO_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        del os.environ["GPT2_REPRO_CACHE"]
    else:
        os.environ["GPT2_REPRO_CACHE"] = old


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory):
    """6 steps of train.py's tiny model: val loss and HellaSwag (4 made-up examples) at steps 0, 3 and 6,
    checkpoints at 3 and 6."""
    d = tmp_path_factory.mktemp("run")
    (d / "hellaswag").mkdir()
    (d / "hellaswag" / "hellaswag_val.jsonl").write_text("".join(json.dumps(ex) + "\n" for ex in HELLASWAG))
    check_ok(run_train(*base_args(data_dir, d / "log", 6, eval_step_interval=3, save_step=3, hellaswag_examples=4,
                                  sample_tokens=0), extra_env={"HELLASWAG_DIR": str(d / "hellaswag")}))
    return d / "log"


@pytest.fixture(scope="module")
def chat_run(run, tmp_path_factory):
    """sft.py on that run: the model learns to answer "OK." and end its turn with <|im_end|>."""
    d = tmp_path_factory.mktemp("chat")
    words = "apple river stone cloud green music paper window garden silver orange candle forest pencil".split()
    (d / "ok.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Say {a} {b}."}, {"role": "assistant", "content": "OK."}]}) + "\n"
        for a in words for b in words[:4]))
    args = dict(model=run, data=d / "ok.jsonl", log_dir=d / "log", max_steps=40, conversations_per_step=8,
                batch_size_per_device=8, max_lr=1e-2, warmup_steps=2, eval_step_interval=10, save_step=1000,
                sample_tokens=0, dtype="fp32", device="cpu", seed=1)
    check_ok(run_train("--no-compile", *[x for k, v in args.items() for x in (f"--{k}", v)], script=SFT))
    return d / "log"


def checkpoint(run_dir):
    return model_io.checkpoint_dirs(run_dir)[-1]


def corpus_sample():
    """About 100 kB of real text (the shared corpus, else this repo's README) and TRICKY."""
    root = REPO_ROOT.parent / "shared" / "corpus"
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    text = "".join(p.read_text(errors="replace") for p in files[:30])[:100_000]
    return (text or (REPO_ROOT / "README.md").read_text()) + TRICKY


def new_tokens(ids, eos):
    """ids up to and including the first eos."""
    return ids[: ids.index(eos) + 1] if eos in ids else ids


# ----------------------------------------------------------------------------- the files of a checkpoint


def test_checkpoints_carry_tokenizer_and_generation_config(run, chat_run, tmp_path):
    for run_dir, chat_model in ((run, False), (chat_run, True)):
        d = checkpoint(run_dir)
        assert TOKENIZER_FILES <= set(os.listdir(d)), os.listdir(d)
        eos = IM_END if chat_model else EOT_TOKEN
        gen = GenerationConfig.from_pretrained(d)  # (an OSError without generation_config.json)
        assert (gen.eos_token_id, gen.bos_token_id, gen.pad_token_id) == (eos, EOT_TOKEN, EOT_TOKEN)
        # config.json's fields as this transformers writes them: "dtype", not the old "torch_dtype"
        ours = json.loads(Path(d, "config.json").read_text())
        AutoModelForCausalLM.from_pretrained(d).save_pretrained(tmp_path / "theirs")
        theirs = json.loads((tmp_path / "theirs" / "config.json").read_text())
        assert "torch_dtype" not in ours and "torch_dtype" not in theirs
        assert ours["dtype"] == theirs["dtype"] == "float32"
        assert ours["eos_token_id"] == eos
    # a model whose vocabulary is not GPT-2's gets no tokenizer
    odd = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=T, vocab_size=101))
    model_io.save_pretrained(odd, tmp_path / "v")
    assert sorted(os.listdir(tmp_path / "v")) == ["config.json", "model.safetensors"]


def test_without_the_bpe_a_checkpoint_is_still_written_and_export_says_why_not(tmp_path, monkeypatch, capsys):
    """A training machine without tiktoken's file: the checkpoint is whole for this project (one warning
    line); an export of it is refused in one line."""
    def no_bpe(chat=False):
        raise cli.Error("cannot load the GPT-2 tokenizer (tiktoken r50k_base: ...)")

    monkeypatch.setattr(model_io, "tokenizer_files", no_bpe)
    model_io.warn_once.cache_clear()
    capsys.readouterr()
    model_io.save_pretrained(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=T)), tmp_path / "m")
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "model.safetensors"]
    assert capsys.readouterr().err == "warning: no tokenizer files written beside the model (cannot load the GPT-2 " \
        "tokenizer (tiktoken r50k_base: ...))\n"
    assert model_io.main(["export", str(tmp_path / "m"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.endswith("error: cannot export without GPT-2's tokenizer (see the warning above)\n")
    assert sorted(os.listdir(tmp_path)) == ["m"]
    model_io.warn_once.cache_clear()


@pytest.mark.parametrize("which", ["run", "chat_run"])
def test_autotokenizer_encodes_and_decodes_as_tiktoken(which, request):
    d = checkpoint(request.getfixturevalue(which))
    chat_model = which == "chat_run"
    tok = AutoTokenizer.from_pretrained(d)
    enc = get_tokenizer()
    text = corpus_sample()
    ids = tok(text)["input_ids"]
    assert ids == enc.encode_ordinary(text)
    assert tok.decode(ids) == text == enc.decode(ids)
    assert len(tok) == (CHAT_VOCAB_SIZE if chat_model else EOT_TOKEN + 1)
    assert tok.model_max_length == T
    assert (tok.bos_token_id, tok.unk_token_id, tok.pad_token_id) == (EOT_TOKEN,) * 3
    assert tok.eos_token_id == (IM_END if chat_model else EOT_TOKEN)
    assert tok("a<|endoftext|>b")["input_ids"] == [64, EOT_TOKEN, 65]
    if chat_model:
        assert tok("<|im_start|>user<|im_end|>")["input_ids"] == [IM_START, 7220, IM_END]
        assert tok.decode([IM_START, 7220, IM_END], skip_special_tokens=True) == "user"


@pytest.mark.parametrize("which", ["run", "chat_run"])
def test_pipeline_greedy_gives_model_generate_tokens(which, request):
    d = checkpoint(request.getfixturevalue(which))
    eos = IM_END if which == "chat_run" else EOT_TOKEN
    prompt = "The capital of France is"
    ids = get_tokenizer().encode(prompt)
    ours = load_model(d).eval().generate(torch.tensor([ids]), 12, temperature=0, eos_token_id=eos)[0].tolist()
    pipe = pipeline("text-generation", model=str(d), device="cpu")
    out = pipe(prompt, do_sample=False, max_new_tokens=12, return_tensors=True)[0]["generated_token_ids"]
    out = out.tolist() if torch.is_tensor(out) else list(out)
    assert out == ids + new_tokens(ours[len(ids):], eos)
    assert len(out) > len(ids)  # (without tokenizer files the pipeline gave the prompt back alone)


# ----------------------------------------------------------------------------- chat models


def test_chat_template_gives_chat_render_tokens(chat_run):
    tok = AutoTokenizer.from_pretrained(checkpoint(chat_run))
    enc = get_tokenizer(chat=True)
    for messages in CONVERSATIONS:
        parsed = chat.parse_messages(messages, "test")
        for prompt in (True, False):
            ids, _ = chat.render(parsed, generation_prompt=prompt)
            got = tok.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=True)
            got = got["input_ids"] if hasattr(got, "keys") else got
            assert got == ids, (messages, prompt)
            assert tok.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False) == enc.decode(ids)
    with pytest.raises(Exception, match="roles are system, developer, user and assistant"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_chat_model_stops_at_im_end_in_transformers(chat_run):
    d = checkpoint(chat_run)
    messages = [{"role": "user", "content": "Say pencil green."}]
    ids, _ = chat.render(messages, generation_prompt=True)
    ours = load_model(d).eval().generate(torch.tensor([ids]), 20, temperature=0, eos_token_id=IM_END)[0, len(ids):]
    ours = new_tokens(ours.tolist(), IM_END)
    assert ours[-1] == IM_END and len(ours) < 20, ours  # the fine-tuned model ends its turn
    hf = AutoModelForCausalLM.from_pretrained(d)
    out = hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0, len(ids):].tolist()
    assert out == ours  # stopped at <|im_end|>, not after 20 tokens
    reply = pipeline("text-generation", model=str(d), device="cpu")(messages, max_new_tokens=20, do_sample=False)
    assert reply[0]["generated_text"][-1] == {"role": "assistant", "content": get_tokenizer().decode(ours[:-1])}


# ----------------------------------------------------------------------------- export


def export(*args):
    return subprocess.run([sys.executable, str(REPO_ROOT / "model_io.py"), "export", *map(str, args)], cwd=REPO_ROOT,
                          env=env(), capture_output=True, text=True, timeout=180)


def card_rows(readme):
    return dict(re.findall(r"^\| ([^|]+?) \| (.+?) \|$", readme, re.M))


def run_card_code(out, monkeypatch, capsys):
    """Run the model card's Python, from the folder above the export (it names the folder)."""
    code = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1)
    monkeypatch.chdir(out.parent)
    capsys.readouterr()
    exec(code, {})
    return capsys.readouterr().out


def test_export_is_a_hub_folder_with_the_runs_figures(run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "tiny-gpt2"
    proc = export(run, out)
    check_ok(proc)
    assert sorted(os.listdir(out)) == sorted(TOKENIZER_FILES | {"README.md", "config.json", "model.safetensors"})
    assert not list(tmp_path.glob(".tmp*"))
    idx = torch.randint(0, EOT_TOKEN + 1, (2, T))
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        ref, _ = load_model(run).eval()(idx)
        assert (hf(idx).logits - ref).abs().max().item() < 1e-5
    readme = (out / "README.md").read_text()
    front = readme.split("---\n")[1]
    assert "library_name: transformers" in front and "- gpt2" in front and "license" not in front
    log = read_log(run)
    val = [r for r in log if "val_loss" in r][-1]
    hs = [r for r in log if "hellaswag_acc_norm" in r][-1]
    assert val["step"] == hs["step"] == 6
    rows = card_rows(readme)
    assert rows["val loss"].startswith(f"{val['val_loss']:.4f} (at step 6,"), rows
    assert rows["HellaSwag acc_norm"].startswith(f"{hs['hellaswag_acc_norm']:.4f} (at step 6, 4 examples"), rows
    assert rows["tokens trained"].startswith(f"{6 * 4 * T:,} (6 steps"), rows
    assert rows["steps"] == "6 of 6" and rows["recipe"].startswith("gpt2: optimizer adamw, schedule cosine"), rows
    assert run_card_code(out, monkeypatch, capsys).startswith("Hello, I'm a language model,")

    # an older checkpoint: the figures logged up to its step
    out3 = tmp_path / "step3"
    assert model_io.main(["export", str(run / "step_000003"), str(out3)]) == 0
    val3 = [r for r in log if "val_loss" in r and r["step"] == 3][-1]
    assert card_rows((out3 / "README.md").read_text())["val loss"].startswith(f"{val3['val_loss']:.4f} (at step 3,")
    assert torch.equal(load_file(out3 / "model.safetensors")["transformer.h.0.mlp.c_fc.weight"],
                       load_file(run / "step_000003" / "model.safetensors")["transformer.h.0.mlp.c_fc.weight"])


def test_export_of_a_chat_model(run, chat_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "tiny-chat"
    check_ok(export(chat_run, out, "--dtype", "bf16"))
    assert "trainer_state.pt" not in os.listdir(out) and TOKENIZER_FILES <= set(os.listdir(out))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(v.dtype == torch.bfloat16 for v in load_file(out / "model.safetensors").values())
    assert AutoModelForCausalLM.from_pretrained(out, dtype="auto").dtype == torch.bfloat16
    rows = card_rows((out / "README.md").read_text())
    val = [r for r in read_log(chat_run) if "val_loss" in r][-1]
    assert rows["fine-tuned from"] == f"`{run.name}`" and rows["steps"] == "40 of 40", rows  # (no local path)
    assert rows["val loss"] == f"{val['val_loss']:.4f} (at step 40, on {val['val_tokens'] // T} held-out conversations)"
    assert rows["tokens trained"] == f"{40 * 8 * T:,} (40 steps of 8 conversations in rows of {T} tokens, padding " \
        "included)" and "HellaSwag acc_norm" not in rows
    # the card's code prints the model's greedy reply (bf16 weights: ours loaded from the export)
    messages = [{"role": "user", "content": "Hello! What can you do?"}]
    ids, _ = chat.render(messages, generation_prompt=True)
    ours = load_model(out).eval().generate(torch.tensor([ids]), 16, temperature=0, eos_token_id=IM_END)[0, len(ids):]
    reply = get_tokenizer().decode([t for t in new_tokens(ours.tolist(), IM_END) if t != IM_END])
    assert run_card_code(out, monkeypatch, capsys) == reply + "\n"


def test_export_never_overwrites_and_is_all_or_nothing(run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    line = error_line(export(run, out))
    assert "not an empty directory" in line and str(out) in line
    assert os.listdir(out) == ["mine.txt"] and (out / "mine.txt").read_text() == "keep me"
    capsys.readouterr()
    assert model_io.main(["export", str(tmp_path / "nope"), str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nope'}: no such directory (a train.py or sft.py run, " \
        "a step_NNNNNN/ or HF-format directory)\n"
    assert not (tmp_path / "x").exists()

    # a write that fails half-way (a full disk) leaves nothing behind: no folder, no temporary one
    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_io, "model_card", full_disk)
    assert model_io.main(["export", str(run), str(tmp_path / "half")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: cannot write {tmp_path / 'half'}: "
                                                            "No space left on device"]
    assert sorted(os.listdir(tmp_path)) == ["taken"]
    monkeypatch.undo()

    # an empty folder is taken, and stays empty until the export is whole (a kill leaves it empty)
    empty, seen, card = tmp_path / "empty", [], model_io.model_card
    empty.mkdir()

    def watch(*a, **k):
        seen.append((os.listdir(empty), [n for n in os.listdir(tmp_path) if n.startswith(".tmp-empty-")]))
        return card(*a, **k)

    monkeypatch.setattr(model_io, "model_card", watch)
    assert model_io.main(["export", str(run), str(empty)]) == 0
    assert seen[0][0] == [] and len(seen[0][1]) == 1, seen  # the weights were in a temporary folder beside it
    assert "model.safetensors" in os.listdir(empty) and sorted(os.listdir(tmp_path)) == ["empty", "taken"]


def test_model_card_figures_are_those_of_the_checkpoint_step(tmp_path):
    """A step logged twice (a resume that fell back past it) counts as its last line says; lines after
    the checkpoint's step are not its figures."""
    settings = {"total_batch_size": 64, "max_steps": 9}
    (tmp_path / "run.json").write_text(json.dumps({"run_id": "x", "settings": settings}))
    lines = [{"step": 0, "recipe": {"name": "gpt2"}}, {"step": 4, "val_loss": 5.0}, {"step": 8, "val_loss": 4.0},
             {"step": 4, "recipe": {"name": "gpt2"}}, {"step": 4, "val_loss": 4.5},
             {"step": 6, "hellaswag_acc_norm": 0.3}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    f = model_io.run_figures(tmp_path, 6)
    assert f["val_loss"] == {"step": 4, "val_loss": 4.5} and f["hellaswag_acc_norm"]["step"] == 6
    assert f["recipe"]["step"] == 4
    assert "val_loss" not in model_io.run_figures(tmp_path, 3)
    assert model_io.run_figures(tmp_path, 9)["val_loss"] == {"step": 8, "val_loss": 4.0}
