"""Tests for generate.py, generate.ipynb and benchmark.ipynb, on a fresh tiny train.py run made here.

The notebooks run headless under nbclient with LOG_DIR set, as CI and `./run.sh` run them; each
test executes an in-memory copy, so the repository's notebooks are never written to.
"""
import base64
import io
import json
import re
import statistics
import subprocess
import sys
from dataclasses import asdict

import matplotlib.image
import nbformat
import numpy as np
import pytest
import torch
from nbclient import NotebookClient

from conftest import REPO_ROOT, T, base_args, check_ok, env, error_line, read_log, run_train
from generate import sample
from model import EOT_TOKEN, GPT, GPTConfig
from model_io import get_tokenizer, load_model, save_pretrained

NOTEBOOKS = ["benchmark.ipynb", "generate.ipynb"]
TOKENS_PER_STEP = 4 * T  # base_args' total_batch_size
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
    return load_model(run_dir / "step_000012").eval()


def execute(name, log_dir, monkeypatch, extra_code=None, first_code=None):
    """Execute a copy of the repo's notebook (plus an optional first and last cell) with LOG_DIR=log_dir."""
    path = REPO_ROOT / name
    before = path.read_bytes()
    nb = nbformat.reads(before.decode(), as_version=4)
    if extra_code:
        nb.cells.append(nbformat.v4.new_code_cell(extra_code))
    if first_code:
        nb.cells.insert(0, nbformat.v4.new_code_cell(first_code))
    monkeypatch.setenv("LOG_DIR", str(log_dir))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(REPO_ROOT)}}).execute()
    assert path.read_bytes() == before, f"{name} was written to"
    return nb


def stream_text(nb):
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                   if o.output_type == "stream")


def png_outputs(nb):
    return [base64.b64decode(o.data["image/png"]) for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if "image/png" in o.get("data", {})]


def summary(text):
    """The summary table's rows: {name: (value, step or None)}."""
    start = text.index("value  at step")
    rows = {}
    for line in text[start:].splitlines()[1:]:
        m = re.match(r"^(\S.*?)\s{2,}(\S+)(?:\s+(\d+))?\s*$", line)
        if m:
            rows[m[1]] = (m[2], None if m[3] is None else int(m[3]))
    return rows


def assert_png(data, min_side=200):
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(io.BytesIO(data), format="png")
    assert img.shape[0] >= min_side and img.shape[1] >= min_side, img.shape
    assert img[..., :3].std() > 0.01, "a blank image"


# ----------------------------------------------------------------------------------------------
# benchmark.ipynb
# ----------------------------------------------------------------------------------------------

# A first cell that wraps Figure.savefig: each figure the notebook saves is measured as saved (its
# extent, its legends' and every plotted line's points in display coordinates), and a last cell
# prints the measurements. (The inline backend's own rendering does not go through Figure.savefig.)
MEASURE_FIGURES = """
import json as _json, os as _os
import matplotlib.figure as _mf
_savefig, _FIGURES = _mf.Figure.savefig, {}

def _measured_savefig(fig, fname, *args, **kwargs):
    _savefig(fig, fname, *args, **kwargs)
    fig.draw_without_rendering()
    legends = fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    _FIGURES[_os.path.basename(fname)] = {
        "figure": list(fig.bbox.extents), "title": fig.get_suptitle(),
        "legends": [list(leg.get_window_extent().extents) for leg in legends],
        "legend_labels": [t.get_text() for leg in legends for t in leg.get_texts()],
        "axes": [{"bbox": list(ax.bbox.extents), "lines": [
            {"label": line.get_label(), "ydata": [float(y) for y in line.get_ydata()],
             "xy": line.get_transform().transform(line.get_xydata()).tolist()} for line in ax.get_lines()]}
            for ax in fig.axes]}

_mf.Figure.savefig = _measured_savefig
"""
REPORT_FIGURES = "print('FIGURES ' + _json.dumps(_FIGURES))"


def execute_measured(log_dir, monkeypatch):
    """benchmark.ipynb executed with its saved figures measured: (notebook, its text, {file name: figure})."""
    nb = execute("benchmark.ipynb", log_dir, monkeypatch, extra_code=REPORT_FIGURES, first_code=MEASURE_FIGURES)
    text = stream_text(nb)
    head, _, figures = text.partition("FIGURES ")
    return nb, head, json.loads(figures)


def lines_under_legends(fig):
    """The labels of the plotted lines that a legend covers: any visible point of a line (sampled
    along its segments: an axhline is only its two ends) strictly inside a legend's box."""
    covered = set()
    for ax in fig["axes"]:
        x0, y0, x1, y1 = ax["bbox"]
        for line in ax["lines"]:
            xy = np.array(line["xy"]).reshape(-1, 2)
            if len(xy) > 1:
                xy = np.concatenate([np.linspace(a, b, 200) for a, b in zip(xy[:-1], xy[1:])])
            xy = xy[(xy[:, 0] >= x0) & (xy[:, 0] <= x1) & (xy[:, 1] >= y0) & (xy[:, 1] <= y1)]
            for lx0, ly0, lx1, ly1 in fig["legends"]:
                if ((xy[:, 0] > lx0) & (xy[:, 0] < lx1) & (xy[:, 1] > ly0) & (xy[:, 1] < ly1)).any():
                    covered.add(line["label"])
    return covered


def check_legends(figures, names=("loss.png", "hellaswag.png")):
    """Each saved figure has a legend that lies inside the figure and covers none of its lines."""
    assert sorted(figures) == sorted(names), figures.keys()
    for name in names:
        fig = figures[name]
        assert fig["legends"], name
        fx0, fy0, fx1, fy1 = fig["figure"]
        for lx0, ly0, lx1, ly1 in fig["legends"]:
            assert fx0 - 0.5 <= lx0 and lx1 <= fx1 + 0.5 and fy0 - 0.5 <= ly0 and ly1 <= fy1 + 0.5, \
                (name, "legend outside the figure", fig["legends"], fig["figure"])
        assert not lines_under_legends(fig), (name, "lines under a legend", lines_under_legends(fig))


def reference_lines(fig, y):
    """The lines of a figure drawn at the constant height y (a reference line)."""
    return [line for ax in fig["axes"] for line in ax["lines"] if line["ydata"] and set(line["ydata"]) == {y}]

def expected_summary(records):
    """The summary computed here from log records: the later line of a step wins."""
    train = {r["step"]: r for r in records if "train_loss" in r}
    val = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    hs = {r["step"]: r["hellaswag_acc_norm"] for r in records if "hellaswag_acc_norm" in r}
    final = max(val)
    best_val = min(val.items(), key=lambda kv: kv[1])
    best_hs = max(hs.items(), key=lambda kv: kv[1])
    mfus = [r["mfu"] for r in train.values() if r["mfu"] is not None]
    return {"steps": max(train) + 1, "final val": (val[final], final), "best val": best_val[::-1],
            "best hs": best_hs[::-1], "tok/s": statistics.median(r["tokens_per_sec"] for r in train.values()),
            "mfu": statistics.median(mfus) if mfus else None}


def check_summary(text, want, tokens_per_step):
    rows = summary(text)
    assert rows["steps trained"][0] == f"{want['steps']:,}", rows
    assert rows["tokens seen"][0] == f"{want['steps'] * tokens_per_step:,}", rows
    for row, key in [("final val loss", "final val"), ("best val loss", "best val"), ("best HellaSwag acc_norm", "best hs")]:
        value, step = rows[row]
        assert float(value) == pytest.approx(want[key][0], abs=5e-5) and step == want[key][1], (row, rows[row], want[key])
    assert float(rows["median tokens/s"][0].replace(",", "")) == pytest.approx(want["tok/s"], abs=0.5), rows
    if want["mfu"] is None:
        assert rows["median MFU"][0] == "n/a", rows
    else:
        assert float(rows["median MFU"][0].rstrip("%")) == pytest.approx(100 * want["mfu"], abs=0.05), rows


def test_benchmark_notebook_on_a_fresh_run(run_dir, newest_model, monkeypatch):
    """Headless on a real run: two figures inline and as PNGs beside the log, their legends inside the
    figure and over none of its lines (GPT-2's loss line drawn); the summary is the log's."""
    nb, text, figures = execute_measured(run_dir, monkeypatch)
    images = png_outputs(nb)
    assert len(images) == 2, text
    for data in images:
        assert_png(data)
    for name in ("loss.png", "hellaswag.png"):
        assert_png((run_dir / name).read_bytes())
    assert f"model: {newest_model.num_params():,} parameters | tokens per step: {TOKENS_PER_STEP:,}" in text, text
    # a tiny model gets the 124M/125M reference lines only
    assert "HellaSwag reference lines: GPT-2 124M 0.2955, GPT-3 125M 0.337\n" in text, text
    records = read_log(run_dir)
    assert any("hellaswag_acc_norm" in r for r in records)  # the run did evaluate HellaSwag
    want = expected_summary(records)
    assert want["steps"] == 12 and want["mfu"] is None  # CPU: no MFU
    check_summary(text, want, TOKENS_PER_STEP)
    check_legends(figures)
    assert len(reference_lines(figures["loss.png"], 3.2924)) == 2  # GPT-2 124M's FineWebEdu val loss, both panels
    assert "chat" not in text and "chat" not in figures["loss.png"]["title"], text


def test_benchmark_notebook_on_a_resumed_350m_run(tmp_path, monkeypatch):
    """A gpt2-medium-sized run resumed after a crash: repeated steps (the later line wins), a cut line,
    MFU, the 350M reference lines (not the 774M ones) and tokens from the checkpoint's total_batch_size."""
    tokens_per_step = 524288
    ckpt = tmp_path / "step_000010"
    ckpt.mkdir()
    torch.save({"step": 10, "args": {"total_batch_size": tokens_per_step},
                "config": asdict(GPTConfig.from_preset("gpt2-medium"))}, ckpt / "trainer_state.pt")

    def train(step, loss, mfu, speed):
        return {"step": step, "train_loss": loss, "lr": 1e-4, "grad_norm": 1.0, "tokens_per_sec": speed + 37 * step ** 1.5,
                "mfu": mfu}

    first = [{"step": 0, "val_loss": 10.9}, {"step": 0, "hellaswag_acc_norm": 0.24, "hellaswag_acc": 0.24, "hellaswag_n": 100}]
    first += [train(s, 10.0 - 0.3 * s, 0.30 + 0.01 * s, 1000.0) for s in range(14)]
    first += [{"step": 12, "val_loss": 3.1}, {"step": 12, "hellaswag_acc_norm": 0.41, "hellaswag_acc": 0.3, "hellaswag_n": 100}]
    # killed in the middle of step 14's line, resumed from step 10: steps 10..13 again, other numbers
    resumed = [train(s, 7.5 - 0.1 * s, None if s == 11 else 0.5, 2000.0) for s in range(10, 20)]
    resumed += [{"step": 12, "val_loss": 6.2}, {"step": 12, "hellaswag_acc_norm": 0.31, "hellaswag_acc": 0.3, "hellaswag_n": 100},
                {"step": 19, "val_loss": 6.0}, {"step": 19, "hellaswag_acc_norm": 0.30, "hellaswag_acc": 0.3, "hellaswag_n": 100}]
    # the cut line has no newline, so the first line of the resumed run lands on it (and is lost)
    lines = [json.dumps(r) for r in first] + ['{"step": 14, "train_lo' + json.dumps(resumed[0])]
    lines += [json.dumps(r) for r in resumed[1:]]
    (tmp_path / "log.jsonl").write_text("\n".join(lines) + "\n")

    nb, text, figures = execute_measured(tmp_path, monkeypatch)
    assert "1 unreadable lines skipped" in text, text
    with torch.device("meta"):
        n_params = GPT(GPTConfig.from_preset("gpt2-medium")).num_params()
    assert f"model: {n_params:,} parameters | tokens per step: {tokens_per_step:,}" in text, text
    assert "GPT-2 350M 0.3752, GPT-3 350M 0.436\n" in text and "GPT-2 124M 0.2955" in text, text
    assert "774M" not in text, text
    assert len(png_outputs(nb)) == 2
    want = expected_summary(first + resumed[1:])
    assert want["final val"] == (6.0, 19) and want["best val"] == (6.0, 19) and want["best hs"] == (0.31, 12)
    check_summary(text, want, tokens_per_step)
    check_legends(figures)


def test_benchmark_notebook_without_checkpoints_plots_against_steps_only(run_dir, tmp_path, monkeypatch):
    """A log with no checkpoint beside it: model and tokens unknown, one panel per figure, no tokens seen."""
    (tmp_path / "log.jsonl").write_bytes((run_dir / "log.jsonl").read_bytes())
    nb = execute("benchmark.ipynb", tmp_path, monkeypatch)
    text = stream_text(nb)
    assert "model: unknown (no checkpoint) | tokens per step: unknown" in text, text
    rows = summary(text)
    assert rows["steps trained"][0] == "12" and rows["tokens seen"][0] == "n/a", rows
    for name in ("loss.png", "hellaswag.png"):
        img = matplotlib.image.imread(tmp_path / name)
        assert img.shape[1] < 2 * img.shape[0], (name, img.shape)  # one panel (two are 3:1)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """4 steps of sft.py on a tiny random 'pretrained' model: val loss at steps 0, 2 and 4, a checkpoint at 4."""
    d = tmp_path_factory.mktemp("sft")
    torch.manual_seed(0)
    save_pretrained(GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)), d / "base")
    (d / "chats.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is {n} plus one?"}, {"role": "assistant", "content": f"{n + 1}."}]}) + "\n"
        for n in range(40)))
    log = d / "log"
    check_ok(run_train("--model", d / "base", "--data", d / "chats.jsonl", "--log_dir", log, "--max_steps", 4,
                       "--conversations_per_step", 4, "--batch_size_per_device", 4, "--eval_step_interval", 2,
                       "--save_step", 4, "--sample_tokens", 0, "--dtype", "fp32", "--device", "cpu", "--no-compile",
                       script=str(REPO_ROOT / "sft.py")))
    return log


@pytest.mark.parametrize("run_json", [True, False], ids=["run.json", "checkpoint-only"])
def test_benchmark_notebook_on_a_chat_fine_tuning_run(sft_run, run_json, tmp_path, monkeypatch):
    """An sft.py run: its losses are on chats' assistant tokens, so no GPT-2 FineWebEdu reference line
    (nor a HellaSwag figure: none was measured); the title and the summary say it is chat fine-tuning.
    Told by its run.json, or without one (a log copied with its checkpoint) by the checkpoint's arguments."""
    if not run_json:
        (tmp_path / "step_000004").mkdir()
        for name in ("log.jsonl", "step_000004/trainer_state.pt"):
            (tmp_path / name).write_bytes((sft_run / name).read_bytes())
        sft_run = tmp_path
    nb, text, figures = execute_measured(sft_run, monkeypatch)
    records = read_log(sft_run)
    val = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    assert sorted(val) == [0, 2, 4] and not any("hellaswag_acc_norm" in r for r in records)
    check_legends(figures, names=("loss.png",))
    assert not (sft_run / "hellaswag.png").exists() and "HellaSwag reference" not in text, text
    loss = figures["loss.png"]
    assert not reference_lines(loss, 3.2924), loss["legend_labels"]
    assert not any("GPT" in label or "FineWebEdu" in label for label in loss["legend_labels"]), loss["legend_labels"]
    # the run's own curves are drawn: val is the log's, on both panels (tokens per step from the checkpoint)
    vals = [line["ydata"] for ax in loss["axes"] for line in ax["lines"] if line["label"].startswith("val")]
    assert vals == [[val[s] for s in sorted(val)]] * 2, vals
    assert "chat fine-tuning" in loss["title"], loss["title"]
    assert "chat fine-tuning" in text[text.index("value  at step") - 300:], text
    want = expected_summary(records + [{"step": 0, "hellaswag_acc_norm": 0.0}])
    rows = summary(text)
    assert rows["final val loss"] == (f"{want['final val'][0]:.4f}", 4), rows
    assert rows["tokens seen"][0] == f"{4 * 4 * 64:,}", rows  # conversations_per_step x block_size a step


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


def test_generate_notebook_shows_samples(run_dir, newest_model, monkeypatch):
    """Headless on a run: prints NUM_SAMPLES samples equal to generate()'s for its settings, and tokens/s."""
    report = "import json; print('RESULT ' + json.dumps(dict(texts=texts, prompt=PROMPT, n=MAX_NEW_TOKENS, sampling=SAMPLING)))"
    nb = execute("generate.ipynb", run_dir, monkeypatch, extra_code=report)
    text = stream_text(nb)
    got = json.loads(text.split("RESULT ", 1)[1])
    want = reference_texts(newest_model, got["prompt"], got["n"], len(got["texts"]), **got["sampling"])
    assert got["texts"] == want
    assert len(want) > 1 and all(t.startswith(got["prompt"]) and len(t) > len(got["prompt"]) for t in want)
    for i, t in enumerate(want, 1):
        assert f"--- sample {i} ---\n{t}\n" in text
    m = re.search(r"samples x (\d+) tokens in [\d.]+ s: ([\d,.]+) tokens/s", text)
    assert m and int(m[1]) == got["n"] and float(m[2].replace(",", "")) > 0, text


def test_committed_notebooks_have_no_outputs():
    """Clean diffs: valid nbformat 4, the python3 kernel, no outputs, no execution counts."""
    for name in NOTEBOOKS:
        nb = nbformat.read(REPO_ROOT / name, as_version=4)
        nbformat.validate(nb)
        assert nb.metadata.kernelspec.name == "python3"
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, (name, cell.source[:60])


# ----------------------------------------------------------------------------------------------
# README.md and BENCHMARKS.md
# ----------------------------------------------------------------------------------------------

DOCS = ["README.md", "BENCHMARKS.md"]


def prose_lines(text):
    """The lines outside fenced code blocks."""
    fenced = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            yield line


def anchors(path):
    """GitHub's anchors for a Markdown file's headings: lower case, punctuation dropped, spaces
    to hyphens, a repeated heading numbered -1, -2, ..."""
    seen = {}
    for line in prose_lines(path.read_text()):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m[1].lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            yield slug if n == 0 else f"{slug}-{n}"


def test_readme_is_a_short_front_door():
    """README.md stays under 250 lines; the dated measurements live in BENCHMARKS.md."""
    lines = (REPO_ROOT / "README.md").read_text().splitlines()
    assert len(lines) < 250, f"README.md has {len(lines)} lines: move details to BENCHMARKS.md or the scripts' docstrings"


@pytest.mark.parametrize("doc", DOCS)
def test_doc_links_point_to_files_and_headings_that_exist(doc):
    """Every relative link in the doc names a file of the repository, and its #anchor (if any) a heading there."""
    path = REPO_ROOT / doc
    links = [t for line in prose_lines(path.read_text()) for t in re.findall(r"\]\(([^)\s]+)\)", line)]
    assert links, f"{doc}: no links found"
    bad = []
    for target in links:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            bad.append(f"{target}: no file {file}")
        elif anchor and dest.suffix == ".md" and anchor not in set(anchors(dest)):
            bad.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not bad, f"{doc}: " + "; ".join(bad)


def test_readme_reference_numbers_are_the_notebooks():
    """README's reference table holds the figures benchmark.ipynb plots (GPT-2 124M 0.2955 and val
    loss 3.2924, GPT-3 125M 0.337): one figure per quantity."""
    readme = (REPO_ROOT / "README.md").read_text()
    table = readme[readme.index("## Reference numbers"):].split("\n## ", 1)[0]
    rows = {cells[0]: cells[1:] for line in table.splitlines() if line.startswith("| ")
            for cells in [[c.strip() for c in line.strip("|").split("|")]]}
    assert rows["GPT-2 124M (OpenAI)"][:2] == ["0.2955", "3.2924"], rows
    assert rows["GPT-3 125M (paper)"][0] == "0.337", rows
    notebook = "".join(c.source for c in nbformat.read(REPO_ROOT / "benchmark.ipynb", as_version=4).cells)
    for figure in ("0.2955", "3.2924", "0.337"):
        assert figure in notebook, figure


def test_benchmark_notebook_plots_the_lm_eval_suite_over_training(tmp_path, monkeypatch):
    """With evals.jsonl beside the log (evals.py --all_checkpoints): evals.png, each task's metric per
    step (the one the suite reads), GPT-2 124M's published figure as a line where there is one, and the
    suite's mean centred accuracy per step, computed here by hand."""
    log = [{"step": s, "train_loss": 5.0 - 0.1 * s, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_sec": 1000.0, "mfu": None}
           for s in range(21)] + [{"step": 20, "val_loss": 4.0}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    (tmp_path / "step_000020").mkdir()
    torch.save({"step": 20, "args": {"total_batch_size": 4096}, "config": asdict(GPTConfig(n_layer=2, n_head=2, n_embd=32))},
               tmp_path / "step_000020" / "trainer_state.pt")
    metrics = {10: {"hellaswag": {"acc": 0.26, "acc_norm": 0.27}, "piqa": {"acc": 0.55, "acc_norm": 0.56},
                    "lambada_openai": {"acc": 0.05, "perplexity": 900.0}, "my_task": {"acc": 0.4}},
               20: {"hellaswag": {"acc": 0.28, "acc_norm": 0.29}, "piqa": {"acc": 0.58, "acc_norm": 0.57},
                    "lambada_openai": {"acc": 0.1, "perplexity": 400.0}, "my_task": {"acc": 0.5}}}
    records = [{"step": s, "task": t, "metrics": m, "settings": {}} for s in (10, 20) for t, m in metrics[s].items()]
    (tmp_path / "evals.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    nb, text, figures = execute_measured(tmp_path, monkeypatch)
    check_legends(figures, names=("loss.png", "evals.png"))
    lines = {line["label"]: line["ydata"] for line in figures["evals.png"]["axes"][0]["lines"]}
    assert lines["hellaswag acc_norm"] == [0.27, 0.29] and lines["piqa acc"] == [0.55, 0.58]
    assert lines["lambada_openai acc"] == [0.05, 0.1] and lines["my_task acc"] == [0.4, 0.5]
    assert len(reference_lines(figures["evals.png"], 0.3114)) == 2  # (both panels) GPT-2 124M's lm-eval HellaSwag acc_norm
    assert len(reference_lines(figures["evals.png"], 0.6289)) == 2  # and its PIQA acc
    assert not reference_lines(figures["evals.png"], 0.5089)  # not the 1.5B's for a small model
    for step in (10, 20):  # (acc_norm - 0.25) / 0.75, (acc - 0.5) / 0.5, acc - 0: my_task is not the suite's
        m = metrics[step]
        want = ((m["hellaswag"]["acc_norm"] - 0.25) / 0.75 + (m["piqa"]["acc"] - 0.5) / 0.5 + m["lambada_openai"]["acc"]) / 3
        assert f"  step {step}: {want:.4f} (3 tasks)" in text, text
        assert lines["gpt2-suite: mean centred accuracy"][(10, 20).index(step)] == pytest.approx(want, abs=1e-12)
