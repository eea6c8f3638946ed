"""``oidl-engine run ... --ray [ADDRESS]``: one download over a Ray cluster.

The driver (the machine that runs the command) owns the run the way the supervisor owns a
single-host run, and the nodes do the work with the single-host engine itself:

1. **Driver**: streams the lists (:mod:`engine.inputs`), skips rows the state DB already has
   as finished (one query per batch, as the supervisor does), and cuts the rest into shards of
   ``--ray-shard-rows`` rows. A shard never spans two lists, so its rows keep their list's
   own format. Rows that cannot be used at all (malformed, bad ImageID) are recorded failed
   here, never sent.
2. **Task** (one Ray task per shard, on whichever node Ray picks): writes the shard's rows to
   a node-local list, runs ``oidl-engine run`` on it (the engine's own pipeline, its own
   processes, that node's cores) into the shared ``--out`` with a node-local state DB and its
   own temporary directory, then returns its rows' records (the ``images`` and ``outputs``
   rows) read back from that DB. Image bytes go from the network to the shared output
   directory on the node; only those small records travel through Ray.
3. **Driver** again: writes the returned records into the one state DB (``INSERT ... ON
   CONFLICT`` by ImageID), so ``results``, resume and skip-finished work exactly as on one
   host, and counts them into the stats the progress line, TUI, web UI and exporter read.

Failures:

- a bad image is a failed *row* inside a successful task (the engine records it);
- a task lost with its node (or its worker process) is retried by Ray (``max_retries``); its
  rows are redone from scratch. Files land by atomic rename under the same final path and DB
  rows are keyed by ImageID, so a redone row is still there exactly once;
- a task whose engine exits with an error raises, and Ray retries it (``retry_exceptions``)
  the same bounded number of times; after that its rows are recorded failed as
  ``task_failed`` with the error as detail (``--retry-failed`` redoes them later).

At most a few shards per task slot are submitted at a time (``ray.wait``), never the whole
list, so memory stays flat and a node that joins mid-run takes queued shards at once.
"""

from __future__ import annotations

import csv
import ctypes
import logging
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from .. import __version__, inputs, state
from ..cli import EXIT_INCOMPLETE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from ..board import Board
from ..config import TMP_DIR_NAME, RunConfig
from ..errors import Reason
from ..inputs import BadRow, ListInfo, ListKind, Row
from ..report import PlainReporter, summary_text
from ..stats import F, Stats, reason_field

log = logging.getLogger("oidl")

#: rows read from the lists per DB lookup of finished rows (as the supervisor does)
_FEED_BATCH = 512
#: shards in flight per task slot of the cluster: one running, one queued behind it
_IN_FLIGHT_PER_SLOT = 2
#: rows of the stats matrix for nodes (more nodes share the last row)
_NODE_ROWS = 32
#: the stats row of the driver's own records (bad rows, shards that failed for good)
_DRIVER_ROW = 1
#: how often the driver refreshes the cluster's size
_RESOURCES_EVERY_S = 2.0
#: the engine's stderr kept in a task's error message
_STDERR_TAIL_CHARS = 1500


class RayUnavailable(Exception):
    """Ray is not installed, or the cluster cannot be reached: a one-line message for the user."""


@dataclass(frozen=True)
class RayConfig:
    """How a run uses the cluster (the engine's own options travel as ``engine_args``)."""

    #: ``auto`` (the cluster this machine belongs to), ``local`` (start a one-machine Ray),
    #: or an address: ``HOST:PORT`` of the head's GCS, ``ray://HOST:10001`` (Ray Client)
    address: str = "auto"
    shard_rows: int = 5000
    #: retries of a shard whose node died or whose engine failed, before its rows fail
    max_retries: int = 3
    dashboard: bool = False
    #: CPUs each shard reserves and the engine's --procs on its node; None: the smallest
    #: node's CPU count, so one shard fills one node
    cpus_per_task: int | None = None
    #: each shard's engine serves its own /metrics on this port of its node (None: off)
    node_metrics_port: int | None = None
    #: the command that runs the engine on a node (empty: the node's own Python, -m engine.cli)
    engine_cmd: tuple[str, ...] = ()
    #: the engine's options, as given on the command line, forwarded to every shard
    engine_args: tuple[str, ...] = ()


# -- shards ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardRow:
    image_id: str
    list_id: int
    line: int
    fields: tuple[str, ...]


@dataclass(frozen=True)
class Shard:
    number: int
    #: the list's own header for Open Images CSV lists; () for one-entry-per-line lists
    header: tuple[str, ...]
    rows: tuple[ShardRow, ...]
    version: str = __version__

    def write_list(self, path: Path) -> None:
        """The shard as a list the engine reads exactly as it read the original rows."""
        with open(path, "w", newline="", encoding="utf-8") as f:
            if self.header:
                w = csv.writer(f, lineterminator="\n")
                w.writerow(self.header)
                w.writerows(r.fields for r in self.rows)
            else:
                f.writelines(f"{r.fields[0]}\n" for r in self.rows)


@dataclass(frozen=True)
class ShardResult:
    number: int
    node: str
    records: tuple[state.ImageRow, ...]
    elapsed_s: float


class ShardError(Exception):
    """The engine failed on a shard (raised in the task, so Ray retries it)."""


def _set_pdeathsig() -> None:
    # The engine dies with the Ray worker that started it (a node lost, a cancelled task):
    # its own children follow through theirs, so nothing runs on without an owner.
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _node_name() -> str:
    import ray

    ctx = ray.get_runtime_context()
    return f"{ray.util.get_node_ip_address()}-{ctx.get_node_id()[:8]}"


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def run_shard(shard: Shard, out_dir: str, procs: int, cfg: RayConfig) -> ShardResult:
    """The Ray task: run the engine on one shard on this node, return its rows' records."""
    t0 = time.monotonic()
    if shard.version != __version__:
        raise ShardError(f"this node has oidl-engine {__version__}, the driver {shard.version}: install the same one")
    node = _node_name()
    work = Path(tempfile.mkdtemp(prefix="oidl-ray-shard-"))
    out = Path(out_dir)
    # Under --out (a rename never crosses filesystems), and its own: every engine empties its
    # temporary directory at start, and other shards write into the same --out right now.
    tmp = out / TMP_DIR_NAME / f"shard-{shard.number}-{uuid.uuid4().hex[:12]}"
    try:
        lst = work / "shard.csv"
        shard.write_list(lst)
        db = work / "shard.sqlite"
        engine = cfg.engine_cmd or (sys.executable, "-m", "engine.cli")
        cmd = [*engine, "run", str(lst), "--out", str(out), "--db", str(db), "--tmp-dir", str(tmp),
               "--ui", "none", "--procs", str(procs), *cfg.engine_args]
        if cfg.node_metrics_port is not None:
            import ray

            host = ray.util.get_node_ip_address()
            # Several shards at once on one node: the first has the port, the others go without.
            if _port_free(host, cfg.node_metrics_port):
                cmd += ["--metrics-port", str(cfg.node_metrics_port), "--metrics-host", host]
        with open(work / "engine.log", "w+b") as err:
            p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                 preexec_fn=_set_pdeathsig)
            try:
                code = p.wait()
            except BaseException:
                p.kill()  # cancelled: take the engine down with us
                p.wait()
                raise
            err.seek(0)
            tail = err.read()[-_STDERR_TAIL_CHARS:].decode("utf-8", "replace").strip()
        if code != 0:
            raise ShardError(f"the engine exited with code {code} on {node}: {tail or 'no message'}")
        records = _read_records(db, shard)
        missing = len(shard.rows) - len(records)
        if missing:
            raise ShardError(f"the engine finished {len(records)} of {len(shard.rows)} rows on {node}: {tail}")
        return ShardResult(shard.number, node, records, time.monotonic() - t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)


def _read_records(db: Path, shard: Shard) -> tuple[state.ImageRow, ...]:
    """The shard's finished rows, with their place in the *original* lists."""
    by_id = {r.image_id: r for r in shard.rows}
    conn = state.connect(db, readonly=True)
    try:
        outputs: dict[str, list[state.OutputRow]] = {}
        for image_id, variant, path, nbytes, width, height in conn.execute(
            "SELECT image_id, variant, path, bytes, width, height FROM outputs"
        ):
            outputs.setdefault(image_id, []).append(state.OutputRow(variant, path, nbytes, width, height))
        out = []
        for (image_id, status, reason, detail, url, nbytes, md5, width, height, fmt, attempts) in conn.execute(
            "SELECT image_id, status, reason, detail, url, bytes, md5, width, height, format, attempts FROM images"
        ):
            src = by_id.get(image_id)
            if src is None:
                continue
            out.append(state.ImageRow(image_id, status, reason, detail, url, nbytes, md5, width, height, fmt,
                                      attempts or 0, src.list_id, src.line, src.fields,
                                      tuple(outputs.get(image_id, ()))))
        return tuple(out)
    finally:
        conn.close()


# -- the driver ------------------------------------------------------------------------------


def _import_ray():  # noqa: ANN202 - the ray module
    try:
        import ray
    except ImportError:
        raise RayUnavailable(
            "--ray needs Ray, which is not installed: pip install 'oidl-engine[ray]'"
        ) from None
    return ray


def _probe(address: str, timeout_s: float = 10.0) -> None:
    """Fail fast, with one line, when nothing listens at a HOST:PORT or ray://HOST:PORT address."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise RayUnavailable(f"--ray {address}: expected auto, local, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise RayUnavailable(f"nothing answers at {address} ({e.strerror or e}): is the head started "
                             "('ray start --head')?") from None


def _bad_row_key(item: BadRow) -> str:
    # the supervisor's key for the same row, so a later single-host run agrees with this one
    return item.image_id or f"bad-row:{item.list_index}:{item.line}"


@dataclass
class _InFlight:
    shard: Shard
    submitted: float


class RayDriver:
    def __init__(self, cfg: RunConfig, rcfg: RayConfig) -> None:
        self.cfg = cfg
        self.rcfg = rcfg
        self.stop_signals = 0
        self.ok = 0
        self.failed = 0
        self.skipped = 0
        self.reasons: dict[str, int] = {}
        self.node_rows: dict[str, int] = {}
        self.per_node: dict[str, tuple[int, int]] = {}  # node -> (shards, rows) it finished
        self.in_flight: dict[object, _InFlight] = {}  # ObjectRef -> shard
        self.ids_in_flight: set[str] = set()
        self.shard_no = 0
        self.feed_done = False
        self.pending_item: Row | None = None  # read, but the next shard's first row
        self.expected: int | None = None  # rows in the run's lists, once counted
        self.broken_lists: list[str] = []

    # -- set-up ------------------------------------------------------------------------------
    def _connect(self):  # noqa: ANN202
        ray = _import_ray()
        # the tasks' own output only with -v: a task's failure reaches the driver as its exception
        kwargs = dict(include_dashboard=self.rcfg.dashboard, log_to_driver=log.isEnabledFor(logging.DEBUG),
                      logging_level=logging.WARNING, configure_logging=False)
        address = None if self.rcfg.address == "local" else self.rcfg.address
        if address not in (None, "auto"):
            _probe(address)  # Ray itself retries an address where nothing listens for minutes
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = "a running Ray cluster" if address == "auto" else f"the Ray cluster at {address}"
            raise RayUnavailable(f"cannot connect to {where}: {str(e).splitlines()[0] if str(e) else e}") from None
        self.ray = ray
        return ray

    def _cpus_per_task(self) -> int:
        sizes = [int(n["Resources"].get("CPU", 0)) for n in self.ray.nodes() if n.get("Alive")]
        sizes = [s for s in sizes if s > 0]
        if self.rcfg.cpus_per_task:
            if sizes and self.rcfg.cpus_per_task > max(sizes):
                log.warning("--procs %d: no node has that many CPUs yet (the largest has %d); shards wait for one",
                            self.rcfg.cpus_per_task, max(sizes))
            return self.rcfg.cpus_per_task
        return min(sizes) if sizes else 1

    def _slots(self) -> int:
        cpus = int(self.ray.cluster_resources().get("CPU", 0))
        return max(1, cpus // self.cpus)

    def _prepare(self) -> None:
        out = self.cfg.output
        out.out_dir.mkdir(parents=True, exist_ok=True)
        out.db_path.parent.mkdir(parents=True, exist_ok=True)
        # this run is the only one writing into --out: leftovers of shards that died are ours
        shutil.rmtree(out.out_dir / TMP_DIR_NAME, ignore_errors=True)
        state.init(out.db_path)
        self.db = state.connect(out.db_path)
        self.infos: list[ListInfo] = []
        self.list_ids: list[int] = []
        for path in self.cfg.lists:
            info = inputs.list_info(path)
            self.infos.append(info)
            self.list_ids.append(state.register_list(self.db, os.path.abspath(path), info.kind.value, info.columns))

    # -- feeding -----------------------------------------------------------------------------
    def _iter_todo(self) -> Iterator[Row | BadRow]:
        """Rows still to do, in list order, skipping rows the DB says are finished."""
        cfg = self.cfg
        it = inputs.iter_rows(list(cfg.lists), subset=cfg.subset, limit=cfg.limit, on_broken=self._list_broken)
        for batch in inputs.batches(it, _FEED_BATCH):
            keys = [item.image_id if isinstance(item, Row) else _bad_row_key(item) for item in batch]
            done = state.finished_ids(self.db, keys, include_failed=not cfg.retry_failed)
            for item, key in zip(batch, keys):
                if key in done or key in self.ids_in_flight:
                    self.skipped += 1
                    self.stats.add(F.SKIPPED)
                    continue
                yield item

    def _list_broken(self, e: inputs.ListBroken) -> None:
        """A list that breaks part-way: its rows so far are done, the next list is read (as on one host)."""
        state.record_broken_list(self.db, self.list_ids[e.list_index], e, self.broken_lists)

    def _next_shard(self) -> Shard | None:
        rows: list[ShardRow] = []
        list_index = -1
        bad: list[state.ImageRow] = []
        seen: set[str] = set()
        while len(rows) < self.rcfg.shard_rows and not self.feed_done:
            if self.pending_item is not None:
                item, self.pending_item = self.pending_item, None
            else:
                item = inputs.next_or_none(self.feed, self.broken_lists)
                if item is None:
                    self.feed_done = True
                    break
            if isinstance(item, BadRow):
                log.warning("%s:%d: %s", item.path, item.line, item.error)
                bad.append(state.ImageRow(_bad_row_key(item), "failed", item.reason.value,
                                          f"{item.path}:{item.line}: {item.error}", None, None, None, None, None,
                                          None, 0, self.list_ids[item.list_index], item.line, item.fields))
                continue
            if item.image_id in seen:  # the same ImageID twice in one shard
                self.skipped += 1
                self.stats.add(F.SKIPPED)
                continue
            if rows and item.list_index != list_index:
                self.pending_item = item  # a shard never spans two lists
                break
            list_index = item.list_index
            seen.add(item.image_id)
            rows.append(ShardRow(item.image_id, self.list_ids[item.list_index], item.line, item.fields))
        if bad:
            self._commit(bad, None)
        if not rows:
            return None
        self.shard_no += 1
        info = self.infos[list_index]
        header = tuple(info.columns) if info.kind is ListKind.OPENIMAGES else ()
        return Shard(self.shard_no, header, tuple(rows))

    def _submit(self) -> None:
        limit = self.slots * _IN_FLIGHT_PER_SLOT
        while len(self.in_flight) < limit and not self.feed_done and not self.stop_signals:
            shard = self._next_shard()
            if shard is None:
                continue
            ref = self.remote.options(name=f"oidl-shard-{shard.number}", num_cpus=self.cpus,
                                      max_retries=self.rcfg.max_retries, retry_exceptions=True).remote(
                shard, str(self.cfg.output.out_dir.resolve()), self.cpus, self.rcfg)
            self.in_flight[ref] = _InFlight(shard, time.monotonic())
            self.ids_in_flight.update(r.image_id for r in shard.rows)

    # -- results -----------------------------------------------------------------------------
    def _node_row(self, node: str | None) -> int:
        if node is None:
            return _DRIVER_ROW
        row = self.node_rows.get(node)
        if row is None:
            row = min(2 + len(self.node_rows), self.stats.layout.rows - 1)
            self.node_rows[node] = row
            if self.monitor is not None:
                self.monitor.name_rows({r: n for n, r in self.node_rows.items()})
        return row

    def _commit(self, records: Sequence[state.ImageRow], node: str | None) -> None:
        state.write_batch(self.db, records)
        self.board.finished(records, time.time())
        m = self.stats.m
        row = self._node_row(node)
        for r in records:
            if r.status == "ok":
                self.ok += 1
                m[row, F.IMAGES_OK] += 1
            else:
                self.failed += 1
                m[row, F.IMAGES_FAILED] += 1
                if r.reason:
                    self.reasons[r.reason] = self.reasons.get(r.reason, 0) + 1
                    m[row, reason_field(r.reason)] += 1
            m[row, F.DOWNLOADED_BYTES] += r.nbytes or 0
            m[row, F.WRITTEN_BYTES] += sum(o.nbytes for o in r.outputs)
            m[row, F.FILES_WRITTEN] += len(r.outputs)
            m[row, F.IMAGES_PROCESSED] += 1 if r.format else 0

    def _collect(self, ref: object) -> None:
        job = self.in_flight.pop(ref)
        self.ids_in_flight.difference_update(r.image_id for r in job.shard.rows)
        try:
            res: ShardResult = self.ray.get(ref)
        except self.ray.exceptions.RayError as e:
            if self.stop_signals or isinstance(e, self.ray.exceptions.TaskCancelledError):
                return  # interrupted: the next run does these rows
            detail = _error_text(e)
            log.error("shard %d (%d rows) failed after %d retries: %s", job.shard.number, len(job.shard.rows),
                      self.rcfg.max_retries, detail)
            self._commit([_failed(r, detail) for r in job.shard.rows], None)
            return
        self._commit(res.records, res.node)
        shards, rows = self.per_node.get(res.node, (0, 0))
        self.per_node[res.node] = (shards + 1, rows + len(res.records))
        log.debug("shard %d: %d rows on %s in %.1f s", res.number, len(res.records), res.node, res.elapsed_s)

    # -- the loop ----------------------------------------------------------------------------
    def _handle_signal(self, signum: int, frame: object) -> None:
        self.stop_signals += 1
        if self.stop_signals == 1:
            print(f"\n{signal.Signals(signum).name}: cancelling the shards in flight; the next run does their rows",
                  file=sys.stderr, flush=True)

    def run(self) -> int:
        from ..monitor import Monitor, MonitorError

        t0 = time.monotonic()
        try:
            ray = self._connect()
        except RayUnavailable as e:
            print(f"oidl-engine: {e}", file=sys.stderr)
            return EXIT_USAGE
        self.monitor = None
        self.stats = None
        old_int = signal.signal(signal.SIGINT, self._handle_signal)
        old_term = signal.signal(signal.SIGTERM, self._handle_signal)
        try:
            try:
                self._prepare()
            except inputs.ListError as e:
                print(f"oidl-engine: {e}", file=sys.stderr)
                return EXIT_USAGE
            self.cpus = self._cpus_per_task()
            self.remote = ray.remote(run_shard)
            self.slots = self._slots()
            if self.cfg.ui != "none":
                print(f"oidl-engine: Ray cluster with {int(ray.cluster_resources().get('CPU', 0))} CPUs: shards of "
                      f"{self.rcfg.shard_rows} rows, {self.cpus} CPU(s) and --procs {self.cpus} each",
                      file=sys.stderr, flush=True)
            self.stats = Stats.create(0, _NODE_ROWS)
            self.board = Board.of(self.stats).writer()
            self.monitor = Monitor.for_run(self.cfg)
            if self.monitor is not None:
                try:
                    urls = self.monitor.start()
                except MonitorError as e:
                    print(f"oidl-engine: cannot start monitoring: {e}", file=sys.stderr)
                    self.monitor = None
                    return EXIT_USAGE
                for what, url in urls.items():
                    print(f"oidl-engine: {what} on {url}", file=sys.stderr, flush=True)
                self.monitor.attach(self.stats.layout)
            threading.Thread(target=self._count, daemon=True).start()
            self.feed = self._iter_todo()
            self._loop()
        finally:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)
            self._shutdown()
        interrupted = self.stop_signals > 0
        if self.cfg.ui != "none":
            print(summary_text(self.ok, self.failed, self.skipped, self.reasons, time.monotonic() - t0, interrupted,
                               self.broken_lists), file=sys.stderr)
            for node, (shards, rows) in sorted(self.per_node.items()):
                print(f"  node {node}: {shards} shards, {rows} rows", file=sys.stderr)
        if interrupted:
            return EXIT_INTERRUPTED
        return EXIT_INCOMPLETE if self.broken_lists else EXIT_OK

    def _count(self) -> None:
        try:
            n = inputs.count_rows(list(self.cfg.lists), subset=self.cfg.subset)
        except inputs.ListError:
            return  # the run reports list errors itself; the count only feeds the ETA
        if self.cfg.limit is not None:
            n = min(n, self.cfg.limit)
        self.expected = n  # the loop copies it into the stats: only the main thread touches the segment

    def _loop(self) -> None:
        reporter = PlainReporter(every_s=self.cfg.progress_line_s) if self.cfg.ui == "plain" else None
        rates = _NodeRates()
        last_resources = time.monotonic()
        while True:
            if self.stop_signals:
                for ref in list(self.in_flight):
                    self.ray.cancel(ref, force=True)
                for ref in list(self.in_flight):  # shards that finished before the cancel still count
                    self._collect(ref)
                return
            now = time.monotonic()
            if now - last_resources >= _RESOURCES_EVERY_S:
                last_resources = now
                self.slots = self._slots()
            self._submit()
            if not self.in_flight:
                return
            ready, _ = self.ray.wait(list(self.in_flight), num_returns=1, timeout=0.5)
            for ref in ready:
                self._collect(ref)
            # every row: the node rows are this loop's bookkeeping, alive as long as it is
            self.stats.m[:, F.HEARTBEAT_MS] = int(time.monotonic() * 1000)
            if self.expected is not None:
                self.stats.set(F.EXPECTED, self.expected)
            if reporter is not None and reporter.last + reporter.every_s <= time.monotonic():
                reporter.tick(self.stats)
                line = rates.line(self.stats, self.node_rows)
                if line:
                    print(line, file=sys.stderr, flush=True)

    def _shutdown(self) -> None:
        if self.monitor is not None:
            self.monitor.stop()
        if self.stats is not None:
            self.stats.close()
            self.stats = None
        if hasattr(self, "db"):
            self.db.close()
        shutil.rmtree(self.cfg.output.out_dir / TMP_DIR_NAME, ignore_errors=True)
        if hasattr(self, "ray"):
            self.ray.shutdown()


class _NodeRates:
    """Per-node images/s over the last ~10 s, for the plain progress line."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self.samples: deque[tuple[float, dict[str, int]]] = deque()

    def line(self, stats: Stats, node_rows: dict[str, int]) -> str:
        now = time.monotonic()
        m = stats.m
        done = {n: int(m[r, F.IMAGES_OK] + m[r, F.IMAGES_FAILED]) for n, r in node_rows.items()}
        self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[0][0] > self.window_s:
            self.samples.popleft()
        t0, first = self.samples[0]
        dt = max(1e-6, now - t0)
        parts = [f"{n} {(d - first.get(n, 0)) / dt:.1f}/s ({d})" for n, d in sorted(done.items())]
        return "  nodes: " + " | ".join(parts) if parts else ""


def _failed(r: ShardRow, detail: str) -> state.ImageRow:
    return state.ImageRow(r.image_id, "failed", Reason.TASK_FAILED.value, detail, None, None, None, None, None, None,
                          0, r.list_id, r.line, r.fields)


def _error_text(e: BaseException) -> str:
    """One line for the failed rows' detail: the engine's own message, or the last line of Ray's."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, ShardError):
        return " | ".join(ln.strip() for ln in str(cause).splitlines() if ln.strip())[:500]
    lines = [ln.strip() for ln in str(cause if isinstance(cause, BaseException) else e).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(e).__name__)[:500]


def run_on_ray(cfg: RunConfig, rcfg: RayConfig) -> int:
    return RayDriver(cfg, rcfg).run()


__all__ = ["RayConfig", "RayUnavailable", "Shard", "ShardResult", "run_on_ray", "run_shard"]
