"""Full-screen terminal UI (``--ui tui``), drawn with rich in the monitor process.

It renders the view :class:`engine.monitor.LiveData` builds once a second: progress with
ETA, rates, downloads in progress with a bar each, resizes in progress, the last successes
and failures, failures by reason, queue and ring occupancy, CPU and RSS per process. It
only reads shared memory, so a slow terminal never slows the engine. The alternate screen
is left on every exit path (normal end, Ctrl-C handled by the supervisor, SIGTERM).
"""

from __future__ import annotations

import datetime as _dt
import sys

from rich.console import Console, Group
from rich.layout import Layout
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from .report import human_bytes, human_duration


def _pct_bar(pct: float | None, width: int = 20) -> ProgressBar:
    if pct is None:
        return ProgressBar(total=None, width=width, pulse=True)
    return ProgressBar(total=100.0, completed=pct, width=width)


def _eta(v: dict) -> str:
    return human_duration(v["eta_s"]) if v.get("eta_s") is not None else "?"


def _header(v: dict) -> Panel:
    done, todo = v["done"], v.get("todo")
    total = f"{done:,}/{todo:,}" if todo is not None else f"{done:,}/counting…"
    pct = v.get("pct")
    top = Table.grid(padding=(0, 2), expand=True)
    top.add_column(ratio=1)
    top.add_column(justify="right")
    top.add_row(
        ProgressBar(total=100.0, completed=pct or 0.0),
        Text(f"{pct if pct is not None else 0:5.1f}%  {total}  ETA {_eta(v)}", style="bold"),
    )
    line = Text.assemble(
        ("ok ", "green"), (f"{v['ok']:,}", "bold green"), "   ",
        ("failed ", "red"), (f"{v['failed']:,}", "bold red"), "   ",
        ("skipped ", "dim"), f"{v['skipped']:,}", "   ",
        ("elapsed ", "dim"), human_duration(v["elapsed_s"]),
    )
    return Panel(Group(top, line), title="oidl-engine", border_style="cyan")


def _rates(v: dict) -> Panel:
    t = Table.grid(padding=(0, 1))
    t.add_column(style="dim")
    t.add_column(justify="right", style="bold")
    t.add_row("images/s", f"{v['images_per_s']:.1f}")
    t.add_row("network/s", human_bytes(v["net_bps"]))
    t.add_row("disk/s", human_bytes(v["disk_bps"]))
    t.add_row("downloaded", human_bytes(v["downloaded_bytes"]))
    t.add_row("written", human_bytes(v["written_bytes"]))
    t.add_row("downloading", str(v["downloads_in_progress"]))
    t.add_row("resizing", str(v["resizes_in_progress"]))
    t.add_row("retries", str(v["retries"]))
    return Panel(t, title="rates", border_style="blue")


def _pipeline(v: dict) -> Panel:
    t = Table.grid(padding=(0, 1))
    t.add_column(style="dim")
    t.add_column(justify="right")
    q = v["queues"]
    t.add_row("wait fetch", str(q["fetch"]))
    t.add_row("wait worker", str(q["worker"]))
    t.add_row("wait writer", str(q["writer"]))
    for r in v["rings"]:
        pct = 100.0 * r["used"] / r["slots"] if r["slots"] else 0.0
        t.add_row(f"ring {r['process']}", Text(f"{pct:3.0f}%", style="red" if pct > 90 else ""))
    return Panel(t, title="queues & rings", border_style="blue")


def _procs(v: dict) -> Panel:
    t = Table(box=None, padding=(0, 1), show_edge=False)
    t.add_column("process", style="dim")
    t.add_column("CPU", justify="right")
    t.add_column("RSS", justify="right")
    for p in v["processes"]:
        t.add_row(p["name"], f"{p['cpu_pct']:.0f}%", human_bytes(p["rss"]))
    return Panel(t, title="processes", border_style="blue")


def _reasons(v: dict) -> Panel:
    t = Table(box=None, padding=(0, 1), show_edge=False)
    t.add_column("reason", style="red")
    t.add_column("rows", justify="right")
    for r, n in sorted(v["reasons"].items(), key=lambda kv: -kv[1]):
        t.add_row(r, f"{n:,}")
    return Panel(t, title="failures by reason", border_style="red")


def _downloads(v: dict) -> Panel:
    t = Table(box=None, padding=(0, 1), show_edge=False, expand=True)
    t.add_column("image", no_wrap=True, ratio=2)
    t.add_column("", width=20)
    t.add_column("%", justify="right", width=5)
    t.add_column("bytes", justify="right", width=9)
    t.add_column("age", justify="right", width=5)
    for d in v["transfers"]:
        pct = d["pct"]
        t.add_row(d["name"], _pct_bar(pct), f"{pct:.0f}%" if pct is not None else "?", human_bytes(d["bytes"]),
                  f"{d['age_s']:.1f}s")
    n = v["downloads_in_progress"]
    return Panel(t, title=f"downloads in progress ({n})", border_style="green")


def _resizes(v: dict) -> Panel:
    t = Table(box=None, padding=(0, 1), show_edge=False, expand=True)
    t.add_column("worker", width=7)
    t.add_column("image", no_wrap=True, ratio=1)
    t.add_column("bytes", justify="right", width=9)
    t.add_column("for", justify="right", width=6)
    for r in v["resizes"]:
        t.add_row(str(r["worker"]), r["name"], human_bytes(r["bytes"]), f"{r['age_s'] * 1000:.0f}ms")
    return Panel(t, title=f"resizes in progress ({v['resizes_in_progress']})", border_style="green")


def _clock(t: float) -> str:
    return _dt.datetime.fromtimestamp(t).strftime("%H:%M:%S")


def _recent_ok(v: dict) -> Panel:
    t = Table(box=None, padding=(0, 1), show_edge=False, expand=True)
    t.add_column("time", width=8, style="dim")
    t.add_column("image", no_wrap=True, ratio=1)
    t.add_column("size", justify="right", width=9)
    t.add_column("pixels", justify="right", width=10)
    for r in v["recent_ok"]:
        t.add_row(_clock(r["t"]), r["name"], human_bytes(r["bytes"]), f"{r['width']}x{r['height']}")
    return Panel(t, title=f"last {len(v['recent_ok'])} successful", border_style="green")


def _recent_failed(v: dict) -> Panel:
    t = Table(box=None, padding=(0, 1), show_edge=False, expand=True)
    t.add_column("time", width=8, style="dim")
    t.add_column("image", no_wrap=True, ratio=1)
    t.add_column("reason", style="red", no_wrap=True)
    t.add_column("detail", no_wrap=True, ratio=2, style="dim")
    for r in v["recent_failed"]:
        t.add_row(_clock(r["t"]), r["name"], r["reason"] or "?", r["text"])
    return Panel(t, title=f"last {len(v['recent_failed'])} failed", border_style="red")


def build(v: dict) -> Layout:
    """The whole screen for one view (pure: testable without a terminal)."""
    root = Layout()
    mid_rows = max(10, 4 + max(len(v["processes"]), len(v["rings"]) + 3, len(v["reasons"])))
    root.split_column(Layout(_header(v), size=4), Layout(name="mid", size=mid_rows), Layout(name="bottom"))
    root["mid"].split_row(Layout(_rates(v)), Layout(_pipeline(v)), Layout(_procs(v)), Layout(_reasons(v)))
    root["bottom"].split_row(Layout(name="left"), Layout(name="right"))
    root["left"].split_column(Layout(_downloads(v)), Layout(_resizes(v), size=max(4, len(v["resizes"]) + 3)))
    root["right"].split_column(Layout(_recent_ok(v)), Layout(_recent_failed(v)))
    return root


class Tui:
    """Context manager: the alternate screen while inside, the terminal as it was after."""

    def __init__(self) -> None:
        self.console = Console(file=sys.stdout)
        self.live = Live(console=self.console, screen=True, auto_refresh=False, redirect_stdout=False,
                         redirect_stderr=False)

    def __enter__(self) -> "Tui":
        self.live.start()
        return self

    def render(self, view: dict) -> None:
        self.live.update(build(view), refresh=True)

    def __exit__(self, *exc: object) -> None:
        self.live.stop()
