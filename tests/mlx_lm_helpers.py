"""Run mlx-lm's command-line tools and its HTTP server as subprocesses, for tests.

Every command runs offline and under a timeout, with the interpreter that
runs the tests, so it uses the same installed mlx-lm and rwkv_mlx. The
server binds 127.0.0.1 only and is always terminated.
"""

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, Iterator

# Seconds one command may take. The commands of the tests took 3 to 17 s on a
# busy 2-core x86_64 machine, and the margin covers a slower CI machine.
COMMAND_TIMEOUT = 180
SERVER_START_TIMEOUT = 120
REQUEST_TIMEOUT = 120


def command_env() -> Dict[str, str]:
    """Return the environment for mlx-lm's commands: no network access to the hub."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


def run_mlx_lm(command: str, *args: Any, cwd: Path) -> str:
    """Run ``python -m mlx_lm COMMAND ARGS`` and return its standard output.

    Raises:
        AssertionError: If the command exits with a non-zero status. The
            message contains the end of its standard error.
    """
    return run_module("mlx_lm", command, *args, cwd=cwd)


def run_module(module: str, *args: Any, cwd: Path) -> str:
    """Run ``python -m MODULE ARGS`` and return its standard output.

    Raises:
        AssertionError: If the command exits with a non-zero status.
    """
    argv = [sys.executable, "-m", module, *map(str, args)]
    result = subprocess.run(
        argv, cwd=cwd, env=command_env(), capture_output=True, text=True, timeout=COMMAND_TIMEOUT
    )
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited with status {result.returncode}. Its standard error ends with:\n"
            f"{result.stderr[-4000:]}"
        )
    return result.stdout


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on at the moment."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post_json(url: str, body: Dict[str, Any]) -> Dict[str, Any]:
    """Send a JSON POST request and return the decoded JSON response."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT) as response:
        return json.loads(response.read())


@contextlib.contextmanager
def mlx_lm_server(model: Path, *args: Any, cwd: Path) -> Iterator[str]:
    """Start ``python -m mlx_lm server`` on 127.0.0.1 and yield its base URL.

    The server is terminated (killed if it does not stop) when the block
    ends, also when it fails.

    Raises:
        AssertionError: If the server exits or does not respond to
            ``/health`` within ``SERVER_START_TIMEOUT`` seconds. The message
            contains its log.
    """
    port = free_port()
    argv = [sys.executable, "-m", "mlx_lm", "server", "--model", str(model), "--host", "127.0.0.1",
            "--port", str(port), *map(str, args)]  # fmt: skip
    log_path = cwd / f"server-{port}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(argv, cwd=cwd, env=command_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            base_url = f"http://127.0.0.1:{port}"
            wait_until_healthy(process, base_url, log_path)
            yield base_url
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def wait_until_healthy(process: subprocess.Popen, base_url: str, log_path: Path) -> None:
    """Poll ``GET /health`` until it returns 200, the process exits, or the start timeout expires."""
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(
                f"mlx_lm server exited with status {process.returncode} before it was ready. Its log:\n"
                f"{log_path.read_text()[-4000:]}"
            )
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise AssertionError(
        f"mlx_lm server did not respond on {base_url}/health within {SERVER_START_TIMEOUT} s. Its log:\n"
        f"{log_path.read_text()[-4000:]}"
    )
