"""run.sh: the sample command its main job prints works as printed, in a fresh shell."""
import os
import shutil
import subprocess
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
