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
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from .report import human_bytes, human_duration

# Every panel is a Text of pre-formatted lines: rich Tables re-measure every cell on every
# frame (a 50-line screen of tables cost ~50-100 ms of CPU per frame; this costs a few ms).


def _bar(pct: float | None, width: int) -> str:
    if pct is None:
        return "·" * width
    full = int(round(width * min(100.0, max(0.0, pct)) / 100))
    return "━" * full + "╌" * (width - full)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"


def _eta(v: dict) -> str:
    return human_duration(v["eta_s"]) if v.get("eta_s") is not None else "?"


def _lines(rows: list[tuple[str, str]], fill: int = 0) -> Text:
    t = Text(no_wrap=True, overflow="ellipsis")
    for i, (line, style) in enumerate(rows):
        if i:
            t.append("\n")
        t.append(line, style=style)
    for _ in range(max(0, fill - len(rows))):
        t.append("\n")
    return t


def _header(v: dict, width: int) -> Panel:
    done, todo = v["done"], v.get("todo")
    total = f"{done:,}/{todo:,}" if todo is not None else f"{done:,}/counting…"
    pct = v.get("pct")
    right = f" {pct if pct is not None else 0:5.1f}%  {total}  ETA {_eta(v)}"
    bar = _bar(pct or 0.0, max(10, width - 4 - len(right)))
    t = Text(no_wrap=True)
    t.append(bar, style="cyan")
    t.append(right, style="bold")
    t.append("\n")
    t.append("ok ", style="green")
    t.append(f"{v['ok']:,}", style="bold green")
    t.append("   failed ", style="red")
    t.append(f"{v['failed']:,}", style="bold red")
    t.append(f"   skipped {v['skipped']:,}   elapsed {human_duration(v['elapsed_s'])}", style="dim")
    return Panel(t, title="oidl-engine", border_style="cyan")


def _kv(rows: list[tuple[str, str]], key_w: int = 12, fill: int = 0) -> Text:
    return _lines([(f"{k:<{key_w}} {val:>10}", "") for k, val in rows], fill)


def _rates(v: dict, fill: int) -> Panel:
    return Panel(_kv([
        ("images/s", f"{v['images_per_s']:.1f}"),
        ("network/s", human_bytes(v["net_bps"])),
        ("disk/s", human_bytes(v["disk_bps"])),
        ("downloaded", human_bytes(v["downloaded_bytes"])),
        ("written", human_bytes(v["written_bytes"])),
        ("downloading", str(v["downloads_in_progress"])),
        ("target", str(v["transfers_target"])),
        ("resizing", str(v["resizes_in_progress"])),
        ("retries", str(v["retries"])),
    ], fill=fill), title="rates", border_style="blue")


def _pipeline(v: dict, fill: int) -> Panel:
    q = v["queues"]
    rows = [("wait fetch", str(q["fetch"])), ("wait worker", str(q["worker"])), ("wait writer", str(q["writer"]))]
    for r in v["rings"]:
        pct = 100.0 * r["used"] / r["slots"] if r["slots"] else 0.0
        rows.append((f"ring {r['process']}", f"{pct:3.0f}%"))
    return Panel(_kv(rows, key_w=15, fill=fill), title="queues & rings", border_style="blue")


def _nodes(v: dict, fill: int) -> Panel:
    """A --ray run: each node's images/s and rows finished (what "queues & rings" is on one host)."""
    rows = [(f"{'node':<18} {'img/s':>7} {'done':>8}", "dim")]
    rows += [(f"{_cut(n['name'], 18):<18} {n['images_per_s']:7.1f} {n['ok'] + n['failed']:>8,}", "")
             for n in v["nodes"]]
    return Panel(_lines(rows, fill), title=f"nodes ({len(v['nodes'])})", border_style="blue")


def _procs(v: dict, fill: int) -> Panel:
    rows = [(f"{'process':<11} {'CPU':>5} {'RSS':>9}", "dim")]
    rows += [(f"{p['name']:<11} {p['cpu_pct']:4.0f}% {human_bytes(p['rss']):>9}", "") for p in v["processes"]]
    return Panel(_lines(rows, fill), title="processes", border_style="blue")


def _reasons(v: dict, fill: int) -> Panel:
    rows = [(f"{r:<16} {n:>8,}", "red") for r, n in sorted(v["reasons"].items(), key=lambda kv: -kv[1])]
    return Panel(_lines(rows[:fill] or [("none", "dim")], fill), title="failures by reason", border_style="red")


def _downloads(v: dict, rows: int, width: int) -> Panel:
    name_w = max(8, width - 4 - 20 - 28)
    lines = [(f"{'image':<{name_w}} {'':20} {'%':>5} {'bytes':>10} {'age':>7}", "dim")]
    for d in v["transfers"][:rows]:
        pct = d["pct"]
        lines.append((f"{_cut(d['name'], name_w):<{name_w}} {_bar(pct, 20)} "
                      f"{(f'{pct:.0f}%' if pct is not None else '?'):>5} {human_bytes(d['bytes']):>10} "
                      f"{d['age_s']:6.1f}s", ""))
    return Panel(_lines(lines, rows + 1), title=f"downloads in progress ({v['downloads_in_progress']})",
                 border_style="green")


def _resizes(v: dict, width: int) -> Panel:
    name_w = max(8, width - 4 - 30)
    lines = [(f"{'worker':<7} {'image':<{name_w}} {'bytes':>10} {'for':>9}", "dim")]
    for r in v["resizes"]:
        lines.append((f"{r['worker']:<7} {_cut(r['name'], name_w):<{name_w}} {human_bytes(r['bytes']):>10} "
                      f"{r['age_s'] * 1000:7.0f}ms", ""))
    return Panel(_lines(lines), title=f"resizes in progress ({v['resizes_in_progress']})", border_style="green")


def _clock(t: float) -> str:
    return _dt.datetime.fromtimestamp(t).strftime("%H:%M:%S")


def _recent_ok(v: dict, rows: int, width: int) -> Panel:
    name_w = max(8, width - 4 - 32)
    lines = [(f"{'time':<8} {'image':<{name_w}} {'size':>10} {'pixels':>11}", "dim")]
    for r in v["recent_ok"][:rows]:
        lines.append((f"{_clock(r['t'])} {_cut(r['name'], name_w):<{name_w}} {human_bytes(r['bytes']):>10} "
                      f"{r['width']:>5}x{r['height']:<5}", ""))
    return Panel(_lines(lines, rows + 1), title=f"last {len(v['recent_ok'])} successful", border_style="green")


def _recent_failed(v: dict, rows: int, width: int) -> Panel:
    name_w = 18
    lines = [(f"{'time':<8} {'image':<{name_w}} {'reason':<14} detail", "dim")]
    for r in v["recent_failed"][:rows]:
        text = f"{_clock(r['t'])} {_cut(r['name'], name_w):<{name_w}} {(r['reason'] or '?'):<14} {r['text']}"
        lines.append((_cut(text, max(10, width - 4)), "red"))
    return Panel(_lines(lines, rows + 1), title=f"last {len(v['recent_failed'])} failed", border_style="red")


def build(v: dict, height: int = 50, width: int = 160) -> Group:
    """The whole screen for one view (pure: testable without a terminal); lists get the rows that fit."""
    nodes = v.get("nodes") or []
    mid_fill = max(9, len(v["processes"]) + 1, len(v["rings"]) + 3, len(nodes) + 1)
    bottom = max(8, height - 4 - (mid_fill + 2))
    half = max(1, (bottom - 6) // 2)
    col = width // 2
    mid = Table.grid(expand=True)
    for _ in range(4):
        mid.add_column(ratio=1)
    second = _nodes(v, mid_fill) if nodes else _pipeline(v, mid_fill)
    mid.add_row(_rates(v, mid_fill), second, _procs(v, mid_fill), _reasons(v, mid_fill))
    resize_h = len(v["resizes"]) + 3
    low = Table.grid(expand=True)
    low.add_column(ratio=1)
    low.add_column(ratio=1)
    low.add_row(
        Group(_downloads(v, max(1, bottom - resize_h - 3), col), _resizes(v, col)),
        Group(_recent_ok(v, half, col), _recent_failed(v, half, col)),
    )
    return Group(_header(v, width), mid, low)


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
        size = self.console.size
        self.live.update(build(view, size.height, size.width), refresh=True)

    def __exit__(self, *exc: object) -> None:
        self.live.stop()
