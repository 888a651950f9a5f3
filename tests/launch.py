"""launch(): serve.py in a subprocess, for the tests and bench.py (which puts tests/ on sys.path for it)."""
import os
import subprocess
import sys
import threading
import time

SERVE_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "serve.py")


def launch(model, *flags, stderr=None, env=None, timeout=120, preexec_fn=None):
    """Start serve.py in a subprocess on a free local port (--port 0) and wait until it answers
    /health; returns (process, base URL). preexec_fn: as Popen's (a test's resource limits)."""
    import httpx

    proc = subprocess.Popen([sys.executable, SERVE_PY, "--model", str(model), "--port", "0",
                             "--log_level", "warning", *flags], stdout=subprocess.PIPE, stderr=stderr, text=True,
                            env=env, preexec_fn=preexec_fn)
    first = []  # the line with the URL (read in a thread, to time out on a server that hangs)
    reader = threading.Thread(target=lambda: first.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    deadline = time.monotonic() + timeout
    while first and " at http://" in first[0] and time.monotonic() < deadline:
        url = first[0].split(" at ")[-1].strip().rstrip("/")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"serve.py --model {model} did not start: {first[0] if first else 'no output'}")
