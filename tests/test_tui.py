"""Issue 5: the terminal UI under a real terminal (tmux), read back with capture-pane."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, write_list
from obs_run import SLOW_HOST_CONNECTIONS, SLOW_RATE_BPS

TMUX = shutil.which("tmux")
pytestmark = pytest.mark.skipif(TMUX is None, reason="tmux is not installed (Debian: apt-get install -y tmux)")


def _tmux(*args: str) -> str:
    return subprocess.run([TMUX, *args], capture_output=True, text=True, timeout=10).stdout


def _screen(session: str) -> str:
    return _tmux("capture-pane", "-p", "-t", session)


def _wait_for(session: str, pred, timeout_s: float = 60.0) -> str:
    deadline = time.monotonic() + timeout_s
    text = ""
    seen = []
    while time.monotonic() < deadline:
        text = _screen(session)
        if pred(text):
            return text
        if text.strip() and (not seen or seen[-1] != text):
            seen.append(text)
        time.sleep(0.3)
    shown = "\n---\n".join(seen[-3:])
    raise AssertionError(f"the screen never showed what we waited for; last screens:\n{shown}")


def test_tui_shows_every_number_and_restores_the_terminal(tmp_path: Path, corpus, server) -> None:
    _, items = corpus
    lst = write_list(tmp_path / "slow.csv", items, server.base_url, rate=str(SLOW_RATE_BPS))
    cmd = [sys.executable, "-m", "engine.cli", "run", str(lst), "--out", str(tmp_path / "out"), "--sizes", "128",
           "--procs", "2", "--max-host-connections", str(SLOW_HOST_CONNECTIONS), "--ui", "auto"]
    shell = f"cd {shlex.quote(str(REPO))} && {shlex.join(cmd)}; echo EXIT=$?; sleep 60"
    session = f"oidl-tui-{time.monotonic_ns()}"
    # a fixed, large window whatever the tmux server's defaults (a detached session may get 80x24)
    _tmux("new-session", "-d", "-s", session, "-x", "180", "-y", "50", f"sleep 0.5; {shell}")
    _tmux("set-option", "-t", session, "window-size", "manual")
    _tmux("resize-window", "-t", session, "-x", "180", "-y", "50")
    try:
        # --ui auto picks the TUI on a terminal; wait until rows have finished and are listed
        frame = _wait_for(session, lambda s: "last" in s and "successful" in s and " 0/63" not in s
                          and "ok " in s and "ETA" in s and "%" in s and "jpg" in s)
        assert _tmux("display", "-p", "-t", session, "#{alternate_on}").strip() == "1"
        for needle in ("images/s", "network/s", "disk/s", "downloads in progress", "resizes in progress",
                       "successful", "failed", "ETA", "/63", "queues & rings", "processes", "fetcher-0",
                       "worker-1", "supervisor", "failures by reason"):
            assert needle in frame, f"{needle!r} not on screen:\n{frame}"
        # a per-transfer percentage bar is shown for a download in progress
        assert any(line.count("%") >= 1 and ".jpg" in line for line in frame.splitlines()), frame
        # numbers move
        first_done = frame.split("/63")[0].split()[-1]
        later = _wait_for(session, lambda s: "/63" in s and s.split("/63")[0].split()[-1] != first_done)
        assert later != frame
        # Ctrl-C: the supervisor drains, the TUI gives the terminal back, the summary is printed
        _tmux("send-keys", "-t", session, "C-c")
        after = _wait_for(session, lambda s: "EXIT=" in s)
        assert "EXIT=130" in after, after
        assert _tmux("display", "-p", "-t", session, "#{alternate_on}").strip() == "0"
        assert _tmux("display", "-p", "-t", session, "#{cursor_flag}").strip() == "1"  # cursor visible again
        assert "interrupted" in after and "downloads in progress" not in after
    finally:
        _tmux("kill-session", "-t", session)
