"""Tests for generate.py, on a fresh tiny train.py run made here."""
import json
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT, base_args, check_ok, env, error_line, run_train
from generate import sample
from model import EOT_TOKEN, GPT, get_tokenizer

HELLASWAG = [{"ctx": f"A man walks {n} dogs in the park and", "endings": ["runs.", "sits down on a bench.",
              "eats a sandwich very slowly.", "waves."], "label": n % 4} for n in range(4)]


@pytest.fixture(scope="module")
def run_dir(data_dir, tmp_path_factory):
    """12 steps of a tiny model: val loss and HellaSwag (4 made-up examples) every 4 steps, checkpoints at 6 and 12."""
    d = tmp_path_factory.mktemp("run")
    (d / "hellaswag").mkdir()
    (d / "hellaswag" / "hellaswag_val.jsonl").write_text("".join(json.dumps(ex) + "\n" for ex in HELLASWAG))
    log = d / "log"
    check_ok(run_train(*base_args(data_dir, log, 12, eval_step_interval=4, save_step=6, hellaswag_examples=4,
                                  sample_tokens=0), extra_env={"HELLASWAG_DIR": str(d / "hellaswag")}))
    return log


@pytest.fixture(scope="module")
def newest_model(run_dir):
    """The run's last checkpoint, found here by name (not through load_model)."""
    return GPT.from_pretrained(run_dir / "step_000012").eval()


# ----------------------------------------------------------------------------------------------
# generate.py and generate.ipynb
# ----------------------------------------------------------------------------------------------

def reference_texts(model, prompt, max_new_tokens, num_samples, **sampling):
    """What model.generate() samples for a batch of num_samples prompts, cut at <|endoftext|>, decoded."""
    enc = get_tokenizer()
    ids = enc.encode(prompt) or [EOT_TOKEN]
    out = model.generate(torch.tensor([ids] * num_samples), max_new_tokens, eos_token_id=EOT_TOKEN, **sampling)
    texts = []
    for row in out.tolist():
        new = row[len(ids):]
        new = new[: new.index(EOT_TOKEN)] if EOT_TOKEN in new else new
        texts.append(enc.decode([t for t in ids if t != EOT_TOKEN] + new))
    return texts


def run_generate(*args):
    return subprocess.run([sys.executable, "generate.py", *map(str, args)], cwd=REPO_ROOT, env=env(),
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("prompt,num_samples,sampling", [
    ("Café 🙂🙂 costs €5, and", 3, dict(temperature=0.9, top_k=20, top_p=0.95, seed=7)),
    ("", 1, dict(temperature=0.0, top_k=50, top_p=1.0, seed=0)),  # unconditional, greedy
], ids=["3-samples-unicode", "unconditional-greedy"])
def test_generate_py_prints_what_generate_samples(run_dir, newest_model, prompt, num_samples, sampling):
    """generate.py on a run dir prints the newest checkpoint's generate() samples for the same batch and seed."""
    n = 40
    proc = run_generate("--model", run_dir, "--prompt", prompt, "--max_new_tokens", n, "--num_samples", num_samples,
                        "--device", "cpu", *[x for k, v in sampling.items() for x in (f"--{k}", v)])
    assert proc.returncode == 0, proc.stderr
    texts = reference_texts(newest_model, prompt, n, num_samples, **sampling)
    if num_samples == 1:
        want = texts[0] + "\n"
    else:
        want = "".join(f"--- sample {i} ---\n{t}\n" for i, t in enumerate(texts, 1))
    assert proc.stdout == want
    assert prompt in proc.stdout  # whole characters, though some are split across tokens
    assert re.search(rf"^{num_samples} x \d+ tokens in [\d.]+ s: [\d.]+ tokens/s \(cpu, fp32\)$", proc.stderr, re.M), proc.stderr


def test_sample_streams_text_as_tokens_come(newest_model):
    """on_text gets the first sample piece by piece; a character split across tokens arrives whole."""
    enc = get_tokenizer()
    prompt = "🙂🙂 said"
    assert len(enc.encode("🙂")) > 1  # the emoji's UTF-8 bytes are split across tokens
    pieces = []
    texts, steps, seconds = sample(newest_model, prompt, 30, 2, on_text=pieces.append, top_k=50, seed=3)
    assert "".join(pieces) == texts[0]
    assert texts == reference_texts(newest_model, prompt, 30, 2, top_k=50, seed=3)
    assert pieces[:3] == ["🙂", "🙂", " said"], pieces[:4]  # each emoji held back until whole
    assert len(pieces) > 10, pieces  # the completion comes token by token, not at the end
    assert steps == 30 and seconds > 0


@pytest.mark.parametrize("args,needle", [
    (["--model", "no_such_run"], "no_such_run"),
    (["--top_p", "0"], "top_p"),
    (["--max_new_tokens", "ten"], "max_new_tokens"),
], ids=["bad-model", "bad-top_p", "not-a-number"])
def test_generate_py_input_errors_are_one_line(args, needle):
    """A bad --model or flag: exit 2, one 'error:' line naming it, no traceback."""
    assert needle in error_line(run_generate(*args))
