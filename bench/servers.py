"""The static file server the benchmark downloads from: nginx, or the engine's loopback server.

nginx (Debian ``nginx-light``) is what a fast image host looks like and costs little CPU, so
the numbers measure the client, not the server. Without nginx the harness falls back to
:class:`engine.loopback.LoopbackServer` (pure asyncio, several times the CPU per request, so
the result says ``server: loopback`` and its throughput numbers are pessimistic).

Both serve the corpus root at ``/`` and the same files throttled per connection at ``/slow/``
(nginx ``limit_rate``; loopback ``?rate=``).
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

_TEMPLATE = Path(__file__).with_name("nginx.conf.template")
_START_TIMEOUT_S = 10.0


def nginx_binary() -> str | None:
    """Path of the nginx executable, or None (it lives in /usr/sbin, often not on PATH)."""
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None
    )


def _free_port() -> int:
    # Port 0 cannot be passed to nginx; a just-released ephemeral port is free in practice
    # and start() fails loudly if another process took it in between.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _user_directive() -> str:
    # nginx started as root drops its workers to "nobody", who cannot read a 0700 directory.
    if os.geteuid() != 0:
        return ""  # not root: the workers stay this user anyway (the directive would only warn)
    return f"user {pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name};"


def _wait_listening(port: int, proc: subprocess.Popen[bytes], what: str, log: Path | None) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            detail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} exited with status {proc.returncode} at start: {detail}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {_START_TIMEOUT_S:.0f} s")


@dataclass
class FileServer:
    """A running server: ``url(relpath)`` for the full-speed files, ``url(relpath, slow=True)`` throttled."""

    kind: str  # "nginx" | "loopback"
    port: int
    pids: tuple[int, ...]  # the server's processes, to exclude or measure their CPU
    slow_rate_bps: int
    _stop: object

    def base_url(self, slow: bool = False) -> str:
        return f"http://127.0.0.1:{self.port}" + ("/slow" if slow and self.kind == "nginx" else "")

    def url(self, relpath: str, slow: bool = False) -> str:
        suffix = f"?rate={self.slow_rate_bps}" if slow and self.kind == "loopback" else ""
        return f"{self.base_url(slow)}/{relpath}{suffix}"

    def stop(self) -> None:
        self._stop()  # type: ignore[operator]

    def __enter__(self) -> "FileServer":
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def start_nginx(root: Path, slow_rate_bps: int) -> FileServer:
    binary = nginx_binary()
    if binary is None:
        raise FileNotFoundError("nginx is not installed (Debian: apt-get install -y nginx-light)")
    tmp = Path(tempfile.mkdtemp(prefix="oidl-bench-nginx-"))
    port = _free_port()
    conf = (
        _TEMPLATE.read_text()
        .replace("@TMP@", str(tmp))
        .replace("@PORT@", str(port))
        .replace("@ROOT@", str(Path(root).resolve()))
        .replace("@SLOW_RATE@", str(slow_rate_bps))
        .replace("@USER_DIRECTIVE@", _user_directive())
    )
    (tmp / "nginx.conf").write_text(conf)
    proc = subprocess.Popen(
        [binary, "-p", str(tmp), "-c", str(tmp / "nginx.conf"), "-e", str(tmp / "error.log")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=(tmp / "stderr.log").open("wb"),
    )
    try:
        _wait_listening(port, proc, "nginx", tmp / "stderr.log")
    except BaseException:
        proc.kill()
        proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    import psutil

    pids = (proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True)))

    def stop() -> None:
        proc.terminate()  # SIGTERM: nginx's fast shutdown (master and worker)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)

    return FileServer("nginx", port, pids, slow_rate_bps, stop)


def start_loopback(root: Path, slow_rate_bps: int) -> FileServer:
    from engine.loopback import LoopbackServer

    server = LoopbackServer(Path(root)).start()
    return FileServer("loopback", server.port, (server.pid or 0,), slow_rate_bps, server.close)


def start_server(root: Path, slow_rate_bps: int, prefer: str = "nginx") -> tuple[FileServer, str | None]:
    """(server, note): nginx when asked and installed, else the loopback server with a note saying why."""
    if prefer == "nginx":
        try:
            return start_nginx(root, slow_rate_bps), None
        except (FileNotFoundError, RuntimeError) as err:
            return start_loopback(root, slow_rate_bps), f"nginx unavailable ({err}); loopback server used instead"
    return start_loopback(root, slow_rate_bps), None
