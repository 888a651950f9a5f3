"""tests/gpu_all.sh, the one script for a lent GPU machine, run here as DRY=1 (the same steps on a CPU,
tiny models), so a renamed flag or a broken table shows before borrowed GPU minutes are spent; and
bench.py's pieces it relies on: --markdown, rewritten after each row, and the train section's median."""
import json
import os
import re
import statistics
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

PARTS = ("decode", "serve", "score", "recipe", "train", "fsdp")


def gpu_all(tmp_path, **env):
    env = {**os.environ, "DRY": "1", "PY": sys.executable, "OMP_NUM_THREADS": "1", "WORK": str(tmp_path), **env}
    r = subprocess.run(["bash", "tests/gpu_all.sh"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    return r.returncode, r.stdout + r.stderr


def tables(out):
    """{section: (caption, [(label, ours, ref, ratio, ref_name)], the rest of its markdown)} after '== tables'."""
    found = {}
    printed = out.split("== tables for BENCHMARKS.md\n", 1)[1].split("== parts")[0]
    for block in re.split(r"\n(?=\d{4}-\d\d-\d\d, )", printed.strip()):
        caption, _, rest = block.partition("\n")
        section = re.search(r"--section (\w+)", caption).group(1)
        rows = [tuple(c.strip() for c in line.strip("|").split("|")) for line in rest.splitlines()
                if line.startswith("| ") and line.count("|") == 6]
        assert rows[:2] == [("benchmark", "ours", "reference", "ratio", "reference"),
                            ("---", "---:", "---:", "---:", "---")], rest
        found[section] = caption, rows[2:], rest
    return found


def num(cell):
    return float(cell.replace(",", "").rstrip("x"))


def test_the_gpu_all_script_runs_on_a_cpu_and_prints_each_part_s_table(tmp_path):
    rc, out = gpu_all(tmp_path)
    assert rc == 0, out[-5000:]
    for part in PARTS:
        assert re.search(rf"^{part}: done in \d+ s$", out, re.M), out[-3000:]
    got = tables(out)
    assert sorted(got) == sorted(PARTS), out[-5000:]
    import torch

    for section, (caption, rows, _) in got.items():
        # the date, the machine, torch and the command, less where the table went
        assert re.fullmatch(rf"\d{{4}}-\d\d-\d\d, CPU, \d+ usable cores, torch {re.escape(torch.__version__)}: "
                            rf"`python bench.py --section {section} .*`", caption), caption
        assert "--markdown" not in caption
        assert rows, (section, out[-3000:])
        for label, ours, ref, ratio, ref_name in rows:
            # the same figures as the text rows bench.py printed as it went (to their rounding), and their ratio
            text = [ln for ln in out.splitlines() if ln.startswith(label + " ") and ln.endswith("  " + ref_name)]
            assert text, (label, out[-3000:])
            t_ours, t_ref, t_ratio = (num(c) for c in text[0][len(label):].split()[:3])
            # (half a unit of the text's last digit, and a hair: 8.15 prints as 8.1)
            assert num(ours) == pytest.approx(t_ours, abs=0.051) and num(ref) == pytest.approx(t_ref, abs=0.051), text
            assert num(ratio) == t_ratio and num(ratio) == pytest.approx(num(ours) / num(ref), rel=0.01, abs=0.01), text
    labels = {s: [(row[0], row[4]) for row in rows] for s, (_, rows, _) in got.items()}
    for b in (1, 4):
        for ref in ("ours dynamic", "transformers generate", "ours no cache"):
            assert (f"decode cpu float32, 2x64, batch {b}, 32 after 32: static (tok/s)", ref) in labels["decode"]
        assert (f"serve: {b} streaming clients, 32 tokens each (total tok/s)", "the same requests one at a time") \
            in labels["serve"]
        assert (f"serve: {b} streaming clients, time to first token (ms)", "the same, one at a time") in labels["serve"]
    assert labels["score"] == [("score: 20 synthetic examples x 4 endings, 8 clients (examples/s)",
                                "the same requests one at a time"),
                               ("score: the 80 requests' forward passes, 8 clients", "one at a time (one request each)")]
    assert len(labels["fsdp"]) == 1 and labels["fsdp"][0][0].endswith(": tokens/s, --fsdp (1 process)") \
        and labels["fsdp"][0][1] == "DDP (1 process)", labels["fsdp"]
    assert len(labels["recipe"]) == 2
    assert labels["recipe"][0][0] == "recipe: training step, modern's optimizers / gpt2's (ms)"
    assert labels["recipe"][1][0].startswith("recipe: modern's tokens to gpt2's final val loss / gpt2's (seeds: ")
    val = re.findall(r"^\| (\d+) \| [\d,]+ \| \d+\.\d{4} \| \d+\.\d{4} \|$", got["recipe"][2], re.M)
    assert val == ["0", "1", "2", "3", "4"], got["recipe"][2]  # the val losses, every step of the 4
    assert labels["train"] == [("train.py 2x64, 4x64 a micro-step, --device cpu --no-compile --dtype fp32: tokens/s, "
                                "median of steps 2-3", "step 0 (compiling, warming up)")]


def test_a_part_past_its_time_box_does_not_stop_the_next_one_nor_leave_processes(tmp_path):
    """decode's box shrunk to 1 s: it is stopped, with the processes it started (a serve.py or train.py
    left running would take the GPU's memory and time from the next part), and train's table prints."""
    py = tmp_path / "py"  # python, which under decode's bench.py also starts a child that would outlive it
    py.write_text(f'#!/bin/bash\ncase " $* " in *" --section decode "*) {sys.executable} -c "import time; '
                  f'time.sleep(60)" {tmp_path}/child >/dev/null 2>&1 & ;; esac\nexec {sys.executable} "$@"\n')
    py.chmod(0o755)
    rc, out = gpu_all(tmp_path, PARTS="decode train", TIME_DECODE="1", PY=str(py))
    ps = subprocess.run(["ps", "-eww", "-o", "pid=,args="], capture_output=True, text=True).stdout  # (-ww: whole lines)
    left = [ln for ln in ps.splitlines() if f"{tmp_path}/child" in ln]
    for ln in left:
        os.kill(int(ln.split()[0]), 9)
    assert rc == 1, out[-3000:]  # (something did not run through)
    assert "decode: STOPPED at its time box of 1 s" in out, out[-3000:]
    assert re.search(r"^train: done in \d+ s$", out, re.M), out[-3000:]
    assert not left, left
    got = tables(out)
    assert list(got) == ["train"], out[-3000:]  # decode had no row yet; train's table is whole
    assert got["train"][1][0][0].startswith("train.py 2x64, 4x64 a micro-step"), got


def test_the_boxes_are_cut_to_the_run_s_total(tmp_path):
    """TOTAL bounds the whole run, set-up included (9 minutes of a lent machine's 15): a part whose box
    would end past it gets what is left, or does not start."""
    rc, out = gpu_all(tmp_path, PARTS="train", TOTAL="12")  # (train alone takes 10 s or more here)
    assert rc == 1 and "train: done" not in out, out[-3000:]
    assert re.search(r"^train: (STOPPED at its time box of \d s|NOT RUN, the run's TOTAL of 12 s spent)$", out,
                     re.M), out[-3000:]
    assert int(re.search(r"== parts \((\d+) s in all\)", out).group(1)) <= 12, out[-3000:]


def test_markdown_keeps_the_rows_of_a_section_stopped_part_way(tmp_path, monkeypatch):
    """--markdown FILE is rewritten after each row: a part its time box stops keeps the rows it had."""
    import bench

    path = tmp_path / "t.md"

    def section(args):
        yield ("first figure (tok/s)", 300.0, 100.0, "a reference")
        assert path.read_text().count("| first figure") == 1  # (on disk before the next row is worked on)
        yield "| step | loss |\n| ---: | ---: |\n| 0 | 1.5 |"
        raise KeyboardInterrupt  # (the time box's signal, as far as the file is concerned)

    monkeypatch.setattr(bench, "SECTIONS", {"fake": section, "model": None})
    monkeypatch.setattr(sys, "argv", ["bench.py", "--section", "fake", "--markdown", str(path), "--quick"])
    with pytest.raises(KeyboardInterrupt):
        bench.main()
    text = path.read_text()
    assert re.match(r"\d{4}-\d\d-\d\d, .*, torch .*: `python bench.py --section fake --quick`\n\n", text), text
    assert "| first figure (tok/s) | 300.0 | 100.0 | 3.00x | a reference |\n" in text
    assert text.rstrip().endswith("| 0 | 1.5 |"), text


def test_train_section_reports_the_median_of_the_steps_after_the_first_two(tmp_path):
    import bench

    recs = [{"step": 0, "recipe": {"name": "gpt2"}}, {"step": 0, "val_loss": 10.9}]
    tok_s = [100.0, 900.0, 410.0, 390.0, 430.0, 10.0]
    recs += [{"step": s, "train_loss": 5.0, "tokens_per_sec": t, "mfu": t / 1000} for s, t in enumerate(tok_s)]
    recs.append({"step": 6, "val_loss": 4.2})
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    steady, first = bench._steady(tmp_path / "log.jsonl")
    assert [r["step"] for r in steady] == [2, 3, 4, 5] and first["tokens_per_sec"] == 100.0
    assert statistics.median(r["tokens_per_sec"] for r in steady) == (390.0 + 410.0) / 2
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[:4]))  # two steps only
    with pytest.raises(SystemExit, match="more --train_steps"):
        bench._steady(tmp_path / "log.jsonl")
