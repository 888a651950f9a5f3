"""run.sh and README: the commands the main job prints and the README's chat lines work as written."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import base_args, check_ok, run_train

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_CACHE = REPO_ROOT.parent / "shared" / "tiktoken_cache"


def printed_sample_command(env):
    """What run.sh prints after 'sample from it: ' at the end of its main job (sample-command is
    the function the main job prints it with), run.sh being started with environment `env`."""
    proc = subprocess.run(["bash", str(REPO_ROOT / "run.sh"), "sample-command"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stderr, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout
    return lines[0]


def test_main_job_prints_the_sample_command_of_sample_command():
    """The main job's closing line is the one sample-command prints: the test below runs that."""
    assert 'echo "sample from it: $(sample_command)"' in (REPO_ROOT / "run.sh").read_text()


@pytest.mark.skipif(not SHARED_CACHE.is_dir(), reason="no ../shared/tiktoken_cache beside the project")
def test_printed_sample_command_works_in_a_fresh_shell_offline(tmp_path, data_dir):
    """The exact command run.sh prints (run.sh itself started without TIKTOKEN_CACHE_DIR, so it
    finds ../shared's cache) samples from a model at log/small when pasted into a fresh shell at
    the project's root: no TIKTOKEN_CACHE_DIR, no venv activated, a minimal PATH, offline (any
    download would go to a closed port) and with an empty temporary directory (where tiktoken
    would otherwise look for a cache of its own).

    The project root here is a copy of the project's scripts with its .venv linked in, so that
    the run at log/small is a tiny one made for the test, never a user's run in the real log/."""
    fresh = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "home"), "TMPDIR": str(tmp_path / "tmp")}
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        fresh[name] = "http://127.0.0.1:9"
    (tmp_path / "home").mkdir()
    (tmp_path / "tmp").mkdir()
    command = printed_sample_command(fresh)

    root = tmp_path / "project"
    root.mkdir()
    for f in REPO_ROOT.glob("*.py"):
        shutil.copy2(f, root / f.name)
    (root / ".venv").symlink_to(REPO_ROOT / ".venv", target_is_directory=True)
    check_ok(run_train(*base_args(data_dir, root / "log" / "small", 2, save_step=2)))
    assert (root / "log" / "small" / "step_000002").is_dir(), os.listdir(root / "log" / "small")

    proc = subprocess.run(["env", "-i", *(f"{k}={v}" for k, v in fresh.items()), "bash", "-c", command],
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{command}\nrc={proc.returncode}\nstdout:{proc.stdout}\nstderr:{proc.stderr}"
    samples = proc.stdout.split("--- sample ")
    assert [s.split(" ---")[0] for s in samples[1:]] == ["1", "2", "3"], proc.stdout
    for s in samples[1:]:
        text = s.split("---\n", 1)[1]
        assert text.startswith("Hello, I'm a language model,") and len(text.strip()) > len("Hello, I'm a language model,"), s
    assert "tokens/s" in proc.stderr, proc.stderr


def readme_blocks(heading):
    """The fenced code blocks of README.md's section `heading`: [(language, text)]."""
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split(f"\n{heading}\n", 1)[1].split("\n#", 1)[0]
    parts = section.split("```")[1::2]
    return [(p.split("\n", 1)[0].strip(), p.split("\n", 1)[1]) for p in parts]


def shell_commands(block):
    """A bash block's commands: continuation lines joined, comments dropped."""
    commands, line = [], ""
    for raw in block.splitlines():
        line += raw.split("  #")[0].rstrip()
        if line.endswith("\\"):
            line = line[:-1] + " "
            continue
        if line.strip():
            commands.append(line.strip())
        line = ""
    return commands


@pytest.mark.skipif(not SHARED_CACHE.is_dir(), reason="no ../shared/tiktoken_cache beside the project")
def test_readme_chat_lines_run_as_pasted_after_the_main_job(tmp_path, data_dir):
    """README's chat section, pasted as written (python = the venv's) into a project holding what
    the main job makes (a base model at log/small, 128 tokens of context; tiny here): sft.py makes
    log/small-chat, generate.py --chat replies, and with serve.py up, the openai lines print a reply.
    (The one change: serve.py and the client get a free port instead of 8000.)"""
    import socket
    import time
    import urllib.request

    from conftest import env

    blocks = readme_blocks("### sft.py: chat")
    bash = [shell_commands(b) for lang, b in blocks if lang == "bash"][0]
    client = [b for lang, b in blocks if lang == "python"][0]
    sft, chat_line, serve = (next(c for c in bash if c.startswith(f"python {s}")) for s in ("sft.py", "generate.py", "serve.py"))
    root = tmp_path / "project"
    root.mkdir()
    for f in list(REPO_ROOT.glob("*.py")) + [REPO_ROOT / "serve.html"]:
        shutil.copy2(f, root / f.name)
    shutil.copytree(REPO_ROOT / "examples", root / "examples")
    check_ok(run_train(*base_args(data_dir, root / "log" / "small", 2, save_step=2, block_size=128, sample_tokens=0,
                                    total_batch_size=512)))
    py = str(REPO_ROOT / ".venv" / "bin" / "python") if (REPO_ROOT / ".venv").is_dir() else sys.executable

    def run(command, **kw):
        return subprocess.run(["bash", "-c", command.replace("python ", f"{py} ", 1)], cwd=root, env=env(),
                              capture_output=True, text=True, timeout=600, **kw)

    check_ok(run(sft))
    proc = run(chat_line, input="Hello!\n")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    answer = proc.stdout.split("assistant> ", 1)[1].split("\nyou>")[0]
    assert answer.strip(), proc.stdout

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert "8000" in client
    server = subprocess.Popen(["bash", "-c", f"exec {serve.replace('python ', py + ' ', 1)} --port {port}"], cwd=root,
                              env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                assert time.time() < deadline, "serve.py never answered /health"
                time.sleep(0.2)
        proc = subprocess.run([py, "-c", client.replace("8000", str(port))], cwd=root, env=env(), capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip(), proc.stdout
    finally:
        server.kill()
        server.wait()
