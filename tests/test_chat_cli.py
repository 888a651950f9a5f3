"""Tests for generate.py --chat, on tiny chat models made here (random weights, chat.to_chat_model,
save_pretrained): every printed reply is model.generate() on chat.render(history, generation_prompt=True)
with the same seed rule (reply n: --seed + n - 1), decoded and cut before <|im_end|>; the history is
kept, cropped from the left when it outgrows the context, and /quit, /exit, /reset, EOF and Ctrl-C work."""
import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, env, perturb_

import chat
import decode
import generate
from model import GPT, GPTConfig
from model_io import IM_END, IM_START, get_tokenizer, load_model, save_pretrained

GENERATE = str(REPO_ROOT / "generate.py")


def chat_checkpoint(path, im_end_boost, block_size=1024, chat_model=True):
    """A tiny chat model (context block_size) saved as a checkpoint dir, and the model as loaded from it.
    im_end_boost raises the <|im_end|> logit: 2.0 ends most replies within 40 tokens, 0.0 hardly ever."""
    torch.manual_seed(0)
    m = perturb_(GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=block_size)), 1, scale=0.5)
    if chat_model:
        m = chat.to_chat_model(m)
        with torch.no_grad():
            m.transformer.wte.weight[IM_END] += im_end_boost * m.transformer.ln_f.bias
    save_pretrained(m, path)
    return load_model(path).eval(), str(path)


@pytest.fixture(scope="module")
def talker(tmp_path_factory):
    return chat_checkpoint(tmp_path_factory.mktemp("talker"), im_end_boost=2.0)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 64-token context: a few turns outgrow it."""
    return chat_checkpoint(tmp_path_factory.mktemp("small"), im_end_boost=2.0, block_size=64)


@pytest.fixture(scope="module")
def rambler(tmp_path_factory):
    """Hardly ever says <|im_end|>: its replies run until stopped."""
    return chat_checkpoint(tmp_path_factory.mktemp("rambler"), im_end_boost=0.0)


def reference(model, ids, max_new_tokens, seed, **sampling):
    """(reply text, ended at <|im_end|>): what model.generate() samples after the tokens ids."""
    out = model.generate(torch.tensor([ids]), max_new_tokens, seed=seed, eos_token_id=IM_END, top_k=50, **sampling)
    new = out[0, len(ids):].tolist()
    ended = IM_END in new
    return get_tokenizer(chat=True).decode(new[: new.index(IM_END)] if ended else new), ended


def reply(model, messages, max_new_tokens, seed, **sampling):
    return reference(model, chat.render(messages, generation_prompt=True)[0], max_new_tokens, seed, **sampling)[0]


def run_chat(model_dir, lines, *args, timeout=120):
    """generate.py --chat in a subprocess, the lines on its stdin, then EOF."""
    return subprocess.run([sys.executable, GENERATE, "--chat", "--model", model_dir, "--device", "cpu", *map(str, args)],
                          input="".join(line + "\n" for line in lines), capture_output=True, text=True,
                          encoding="utf-8", env={**env(), "PYTHONIOENCODING": "utf-8"}, cwd=REPO_ROOT, timeout=timeout)


def main_chat(monkeypatch, capsys, model_dir, lines, *args):
    """generate.main(['--chat', ...]) in this process, the lines on stdin; returns (exit status, stdout with
    stderr's notes in place, less the first line: the banner)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
    capsys.readouterr()
    monkeypatch.setattr(sys, "stderr", sys.stdout)  # the notes where they were printed
    rc = generate.main(["--chat", "--model", model_dir, "--device", "cpu", *map(str, args)])
    banner, _, out = capsys.readouterr().out.partition("\n")
    assert banner.startswith("(chatting with a "), banner
    return rc, out


def test_chat_replies_are_generate_on_the_whole_history(talker):
    """Two turns, /reset, the first message again, EOF: each reply is generate() on the history so far
    with seed + reply number; after /reset the conversation starts over (same reply); EOF exits 0."""
    model, path = talker
    u1, u2 = "Hi! Zürich or 東京? 🙂", "Tell me more about it."
    sampling = dict(temperature=0.9, top_p=0.95)
    proc = run_chat(path, [u1, u2, "/reset", u1], "--max_new_tokens", 40, "--seed", 7,
                    "--temperature", 0.9, "--top_p", 0.95)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    r1 = reply(model, [{"role": "user", "content": u1}], 40, seed=7, **sampling)
    h2 = [{"role": "user", "content": u1}, {"role": "assistant", "content": r1}, {"role": "user", "content": u2}]
    r2 = reply(model, h2, 40, seed=8, **sampling)
    assert r2 != reply(model, h2[2:], 40, seed=8, **sampling)  # premise: the history changes the reply
    assert proc.stdout == (f"you> {u1}\nassistant> {r1}\nyou> {u2}\nassistant> {r2}\nyou> /reset\n"
                           f"you> {u1}\nassistant> {r1}\nyou> \n"), proc.stderr
    assert "history cleared" in proc.stderr


def test_ctrl_c_stops_a_reply_and_keeps_what_was_printed(rambler):
    """SIGINT mid-reply: the reply stops, the prompt returns, the next reply sees the stopped one as
    printed (so it is generate() on that history, seed + 1); SIGINT again, then EOF: exit 0, no traceback."""
    model, path = rambler
    proc = subprocess.Popen([sys.executable, GENERATE, "--chat", "--model", path, "--device", "cpu",
                             "--max_new_tokens", "100000"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**env(), "PYTHONIOENCODING": "utf-8"}, cwd=REPO_ROOT)
    out, err = bytearray(), bytearray()

    def drain(pipe, buf):
        while chunk := os.read(pipe.fileno(), 4096):
            buf.extend(chunk)

    threads = [threading.Thread(target=drain, args=(p, b), daemon=True) for p, b in ((proc.stdout, out), (proc.stderr, err))]
    for t in threads:
        t.start()

    def wait_for(cond, what, timeout=90):
        deadline = time.monotonic() + timeout
        while not cond(out.decode("utf-8", "replace")):
            assert proc.poll() is None, f"exited {proc.returncode} waiting for {what}:\n{out.decode()}\n{err.decode()}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{out.decode()}\n{err.decode()}"
            time.sleep(0.02)

    try:
        u1, u2 = "Tell me a long story.", "Go on."
        wait_for(lambda s: s == "you> ", "the prompt")
        proc.stdin.write(f"{u1}\n".encode())
        proc.stdin.flush()
        wait_for(lambda s: len(s.partition("assistant> ")[2]) > 30, "reply 1 to stream")
        proc.send_signal(signal.SIGINT)
        wait_for(lambda s: s.endswith("\nyou> "), "the prompt after reply 1")
        proc.stdin.write(f"{u2}\n".encode())
        proc.stdin.flush()
        wait_for(lambda s: len(s.split("assistant> ")[-1]) > 30 and s.count("assistant> ") == 2, "reply 2 to stream")
        proc.send_signal(signal.SIGINT)
        wait_for(lambda s: s.endswith("\nyou> "), "the prompt after reply 2")
        proc.stdin.close()  # EOF
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for t in threads:
        t.join(timeout=10)
    stdout, stderr = out.decode(), err.decode()
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert stdout.startswith(f"you> {u1}\nassistant> ") and stdout.endswith("\nyou> \n"), stdout
    p1, sep, rest = stdout[len(f"you> {u1}\nassistant> "):].partition(f"\nyou> {u2}\nassistant> ")
    p2 = rest[: -len("\nyou> \n")]
    assert sep and len(p1) >= 30 and len(p2) >= 30, stdout
    assert stderr.count("reply stopped") == 2, stderr
    # each printed reply is the start of what generate() samples (up to where it was stopped)
    r1, _ = reference(model, chat.render([{"role": "user", "content": u1}], True)[0], 300, seed=42)
    assert len(r1) > len(p1) and r1.startswith(p1), (p1, r1)
    h2 = [{"role": "user", "content": u1}, {"role": "assistant", "content": p1}, {"role": "user", "content": u2}]
    r2, _ = reference(model, chat.render(h2, True)[0], 300, seed=43)
    assert len(r2) > len(p2) and r2.startswith(p2), (p2, r2)


def interrupt(cmd, ready, stdin=None):
    """Start cmd, wait until ready(proc) returns (reading the first output, or sleeping), send SIGINT;
    returns (exit status, what was read by ready, the rest of stdout, stderr)."""
    proc = subprocess.Popen(cmd, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(), cwd=REPO_ROOT)
    try:
        first = ready(proc)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, first, out, err


def test_ctrl_c_at_the_prompt_exits_cleanly(talker):
    _, path = talker
    rc, first, stdout, stderr = interrupt([sys.executable, GENERATE, "--chat", "--model", path, "--device", "cpu"],
                                          lambda p: p.stdout.read(5), stdin=subprocess.PIPE)
    assert first == b"you> ", first  # input() had written its prompt and waited for a line
    assert rc == 0 and b"Traceback" not in stderr, stderr.decode()
    assert stdout == b"\n"


@pytest.mark.parametrize("command", ["/quit", "/exit"])
def test_quit_ends_the_chat(talker, command, monkeypatch, capsys):
    model, path = talker
    rc, out = main_chat(monkeypatch, capsys, path, ["Hello", f"  {command} ", "never answered"], "--max_new_tokens", 20)
    r1 = reply(model, [{"role": "user", "content": "Hello"}], 20, seed=42)
    assert rc == 0
    assert out.startswith(f"you> Hello\nassistant> {r1}\n") and out.endswith(f"you>   {command} \n"), out
    assert out.count("assistant> ") == 1


def fit(system, history, limit):
    """The test's own cropping: drop the fewest oldest (user, reply) pairs so that the rendered prompt has
    at most limit tokens; then cut the last message's text from its start. Returns (ids, dropped, cut)."""
    for dropped in range(0, len(history), 2):
        ids = chat.render(system + history[dropped:], generation_prompt=True)[0]
        if len(ids) <= limit or dropped == len(history) - 1:
            break
    enc = get_tokenizer()
    text = enc.encode_ordinary(history[-1]["content"])
    cut = 0
    while len(ids) > limit:
        cut += 1
        ids = (chat.render(system)[0] + [IM_START] + enc.encode_ordinary("user\n") + text[cut:] + [IM_END]
               + enc.encode_ordinary("\n") + [IM_START] + enc.encode_ordinary("assistant\n"))
    return ids, dropped, cut


def test_history_outgrowing_the_context_is_cropped_from_the_left(small, monkeypatch, capsys):
    """A 64-token context, 16 tokens kept for the reply: the oldest turns go (whole, the system message
    stays, a note says how many), and a message too long alone loses its first tokens (a note says so);
    every reply is generate() on what is left."""
    model, path = small
    system = [{"role": "system", "content": "Be brief."}]
    users = ["Hello there.", "How are you?", "What is new?", "Say more.", "Why?",
             " ".join(["word"] * 60), "Short again."]
    rc, out = main_chat(monkeypatch, capsys, path, users, "--max_new_tokens", 16, "--system", "Be brief.", "--seed", 3)
    assert rc == 0
    want, history, notes = "", [], 0
    for n, u in enumerate(users):
        history.append({"role": "user", "content": u})
        ids, dropped, cut = fit(system, history, 64 - 16)
        want += f"you> {u}\n"
        if dropped:
            want += f"(history cropped: the {dropped} oldest messages dropped to fit the 64-token context)\n"
            history = history[dropped:]
            notes += 1
        if cut:
            want += f"(message cropped: its first {cut} tokens dropped to fit the 64-token context)\n"
        r, ended = reference(model, ids, 16, seed=3 + n)
        want += f"assistant> {r}\n" + ("" if ended else "(reply cut at --max_new_tokens 16)\n")
        history.append({"role": "assistant", "content": r})
    want += "you> \n"
    assert notes >= 2 and "(message cropped: its first" in want  # premise: both kinds of cropping happen
    assert out == want


def test_sample_from_a_chat_model_without_chat_decodes_its_markers(talker):
    """Plain sampling from a chat model (no --chat): a sampled <|im_end|> prints as its text, no KeyError."""
    model, _ = talker
    texts, _, _ = generate.sample(model, "Hi there", 40, seed=0)
    assert "<|im_end|>" in texts[0]


def run_main(argv, capsys):
    rc = generate.main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return rc, err


def test_chat_on_a_base_model_is_one_error_line(tmp_path, capsys):
    _, path = chat_checkpoint(tmp_path, 0, chat_model=False)
    rc, err = run_main(["--chat", "--model", path, "--device", "cpu"], capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith("error:") and "sft.py" in err[0] and "not a chat model" in err[0], err


def test_a_system_message_longer_than_the_context_is_one_error_line(small, capsys):
    _, path = small
    rc, err = run_main(["--chat", "--model", path, "--device", "cpu", "--system", "word " * 50], capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith("error:") and "--system" in err[0], err


@pytest.mark.parametrize("argv,flag", [
    (["--chat", "--num_samples", "2"], "--num_samples"),
    (["--chat", "--prompt", "Hi"], "--prompt"),
    (["--system", "Be brief."], "--system"),
])
def test_flags_that_do_not_go_together(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        generate.main(argv + ["--model", "no_such_model"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error:") and flag in err[0], err


def test_compile_warms_the_decoder_before_it_samples(small, monkeypatch, capsys):
    """generate.py --compile compiles the decode step before sampling (so its tokens/s counts no
    compiling, and a note says what the wait is), and prints the samples of the uncompiled path."""
    _, path = small
    argv = ["--model", path, "--device", "cpu", "--num_samples", "3", "--max_new_tokens", "12", "--seed", "5"]
    assert generate.main(argv) == 0
    want = capsys.readouterr().out
    steps, started = [], []

    def compile_(fn, **kw):  # torch.compile's stand-in: counts the decode steps
        def step(*args):
            steps.append(args[0].size(0))
            return fn(*args)
        return step

    real = decode.generate_stream
    monkeypatch.setattr(torch, "compile", compile_)
    monkeypatch.setattr(decode, "generate_stream", lambda *a, **k: (started.append(len(steps)), real(*a, **k))[1])
    assert generate.main(argv + ["--compile"]) == 0
    out, err = capsys.readouterr()
    assert out == want and "(compiling the decode step...)" in err
    assert started and started[0] > 0 and set(steps[: started[0]]) == {1, 2, 4}  # every bucket up to 3 rows, first
    assert len(steps) > started[0]  # and the samples came through it


# ----------------------------------------------------------------------------------------------
# generate.py's ends: Ctrl-C, a closed stdout or stdin, a batch too big, no --model


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny base (not chat) model: plain sampling."""
    return chat_checkpoint(tmp_path_factory.mktemp("base"), 0, chat_model=False)


def sample_cmd(model_dir, *args):
    return [sys.executable, GENERATE, "--model", model_dir, "--device", "cpu", *map(str, args)]


def assert_quiet(stderr):
    for word in ("Traceback", "Exception ignored", "KeyboardInterrupt", "BrokenPipeError"):
        assert word not in stderr, stderr


def test_a_stdout_closed_by_head_ends_quietly(base):
    """`generate.py --num_samples 2 | head -1` (a real pipe): head prints its line, generate.py exits 141 (as
    SIGPIPE would end it) at its next write, without a traceback, long before its 2000 tokens are done."""
    gen = subprocess.Popen(sample_cmd(base[1], "--num_samples", 2, "--max_new_tokens", 2000), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, env=env(), cwd=REPO_ROOT)
    head = subprocess.Popen(["head", "-1"], stdin=gen.stdout, stdout=subprocess.PIPE)
    gen.stdout.close()  # (head's stdin is now the pipe's only reader)
    try:
        out, _ = head.communicate(timeout=120)
        err = gen.stderr.read().decode()
        rc = gen.wait(timeout=120)
    finally:
        for p in (gen, head):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert out == b"--- sample 1 ---\n"
    assert rc == 141, (rc, err)
    assert_quiet(err)
    assert " tokens/s " not in err  # (it stopped: it did not finish the samples)


def test_ctrl_c_while_sampling_exits_130_quietly(base):
    """SIGINT while sample 1 streams: exit 130, no traceback (outside --chat, which has its own Ctrl-C)."""
    prompt = "Hello, I'm a language model,"
    rc, got, _, err = interrupt(sample_cmd(base[1], "--max_new_tokens", 100000),
                                lambda p: p.stdout.read(len(prompt.encode()) + 20))
    assert got.startswith(prompt.encode()), got  # the prompt, then the sample streaming
    assert rc == 130, err.decode()
    assert_quiet(err.decode())


def test_ctrl_c_while_it_starts_ends_it_quietly(base):
    """SIGINT half a second in (Python still importing torch, on this machine): no traceback either; it
    ends as SIGINT ends a program (killed by it, or exit 130)."""
    rc, _, _, err = interrupt(sample_cmd(base[1]), lambda p: time.sleep(0.5))
    assert rc in (130, -signal.SIGINT), (rc, err.decode())
    assert_quiet(err.decode())


@pytest.mark.parametrize("stdin", ["closed", "devnull"])
def test_chat_with_stdin_closed_or_empty_ends_quietly(talker, stdin):
    """--chat with stdin closed (`<&-`: Python's sys.stdin is None) or at its end at once (`< /dev/null`):
    as at EOF, exit 0, an empty line on stdout, no traceback."""
    _, path = talker
    kw = dict(preexec_fn=lambda: os.close(0)) if stdin == "closed" else dict(stdin=subprocess.DEVNULL)
    proc = subprocess.run([sys.executable, GENERATE, "--chat", "--model", path, "--device", "cpu"], capture_output=True,
                          text=True, env=env(), cwd=REPO_ROOT, timeout=120, **kw)
    assert proc.returncode == 0, proc.stderr
    assert_quiet(proc.stderr)
    assert proc.stdout.endswith("\n") and proc.stdout.strip() in ("", "you>"), proc.stdout


def run_limited(cmd, spare):
    """cmd with `spare` bytes of address space over a fresh Python's with torch imported (not this
    process's: a pytest worker that has imported more holds more)."""
    import resource
    probe = "import torch; print(next(ln.split()[1] for ln in open('/proc/self/status') if ln.startswith('VmSize:')))"
    own = int(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env()).stdout) << 10

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (own + spare, own + spare))

    return subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=REPO_ROOT, timeout=120, preexec_fn=limit)


def one_error_line(proc):
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (proc.returncode, proc.stderr)
    return lines[0]


def test_too_many_samples_for_one_batch_is_one_line_before_any_allocation(base):
    """--num_samples 1e9 (one batch: petabytes of logits): refused at once, one line saying the most this
    machine can take, under a 2 GiB memory limit that building the batch would break."""
    line = one_error_line(run_limited(sample_cmd(base[1], "--num_samples", "1e9"), 2 << 30))
    assert "--num_samples 1000000000" in line and "GiB" in line and "at most" in line, line
    fit = int(line.split("at most ")[1].split(",")[0])
    assert 0 < fit < 10**9, line


def test_a_batch_that_runs_out_of_memory_is_one_line(base):
    """A batch the estimate lets through (it counts the machine's free memory, not a process limit) but
    that cannot be allocated: one line saying so, not the allocator's traceback."""
    proc = run_limited(sample_cmd(base[1], "--num_samples", 4000, "--max_new_tokens", 4), 1 << 30)
    line = one_error_line(proc)
    assert ("out of memory" in line and "--num_samples" in line) or "at most" in line, line


def test_the_default_model_is_the_main_jobs_run_and_a_missing_one_names_the_runs_it_sees(base, tmp_path, monkeypatch,
                                                                                        capsys):
    """No --model: log/small (what ./run.sh trains). Missing, the error names the models under log/ (run
    directories with checkpoints, HF-format dirs), or says there are none."""
    monkeypatch.chdir(tmp_path)
    rc, err = run_main(["--device", "cpu"], capsys)
    assert rc == 2 and len(err) == 1 and "'log/small'" in err[0] and "no model under log/" in err[0], err
    step = tmp_path / "log" / "mine" / "step_000010"
    step.mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        (step / f).write_bytes((Path(base[1]) / f).read_bytes())
    (tmp_path / "log" / "notes").mkdir()
    rc, err = run_main(["--device", "cpu"], capsys)
    assert rc == 2 and len(err) == 1 and "models under log/: log/mine" in err[0] and "notes" not in err[0], err
    (tmp_path / "log" / "mine").rename(tmp_path / "log" / "small")
    assert generate.main(["--device", "cpu", "--max_new_tokens", "5", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert out == generate.sample(base[0], "Hello, I'm a language model,", 5, seed=1, top_k=50)[0][0] + "\n"


def test_endoftext_written_in_a_prompt_is_that_token(base):
    """--prompt 'Hi<|endoftext|>There': the document separator between two texts, not an error."""
    model, _ = base
    enc = get_tokenizer()
    ids = enc.encode("Hi") + [enc.eot_token] + enc.encode("There")
    want = model.generate(torch.tensor([ids]), 6, seed=2, eos_token_id=enc.eot_token)[0, len(ids):].tolist()
    want = want[: want.index(enc.eot_token)] if enc.eot_token in want else want
    texts, _, _ = generate.sample(model, "Hi<|endoftext|>There", 6, seed=2)
    assert texts == ["HiThere" + enc.decode(want)]
