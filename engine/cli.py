"""The ``oidl-engine`` command line: run, demo, results, metadata."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from . import __version__
from .config import FetchConfig, OutputConfig, RunConfig, SourceConfig
from .ring import RingConfig
from .variants import DEFAULT_QUALITY, PipelineConfig, parse_sizes, parse_variant

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_RUN_ERROR = 1
EXIT_INCOMPLETE = 3
EXIT_INTERRUPTED = 130

RUN_EXIT_STATUS = """\
exit status:
  0    every row of every list was processed (rows that failed are in the state DB)
  1    the run could not go on (unwritable output, a process that keeps dying)
  2    bad usage, or a list that cannot be read at all (nothing was started)
  3    incomplete: a list broke part-way (e.g. a truncated .gz); its rows before the break and
       every other list were processed, the break is in the log, the summary and the state DB
       (lists.error_reason, error_line, error_detail)
  130  interrupted (Ctrl-C, SIGTERM): run the same command again to resume"""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def positive(kind: type = int):  # noqa: ANN202
    def conv(text: str):  # noqa: ANN202
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
        return v

    return conv


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return v


def _byte_size(text: str) -> int | None:
    """``1G``, ``512M``, ``64k``, ``1000`` -> bytes; 0 -> None (no limit)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = 1
    if t and t[-1] in "KMGT":
        mult = 1024 ** ("KMGT".index(t[-1]) + 1)
        t = t[:-1]
    try:
        v = float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 512M or 2G, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return int(v * mult) or None


def _rgb(text: str) -> tuple[int, int, int]:
    t = text.strip().lstrip("#")
    try:
        if "," in t:
            parts = tuple(int(p) for p in t.split(","))
        elif len(t) == 6:
            parts = tuple(int(t[i : i + 2], 16) for i in (0, 2, 4))
        else:
            raise ValueError
        if len(parts) != 3 or not all(0 <= p <= 255 for p in parts):
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected R,G,B (0-255) or a hex colour like ffffff, got {text!r}") from None
    return parts  # type: ignore[return-value]


def _add_run_options(p: argparse.ArgumentParser, *, lists_required: bool = True) -> None:
    if lists_required:
        p.add_argument(
            "lists",
            nargs="+",
            metavar="LIST",
            help="image lists: Open Images images.csv of any release (.csv or .csv.gz), CVDF split/ImageID "
            "lists, or plain URL lists (one per line). Several lists are processed in one run.",
        )
        p.add_argument("--out", required=True, type=Path, help="output directory")
    g = p.add_argument_group("selection")
    g.add_argument("--subset", choices=("train", "validation", "test"), help="only rows of this subset")
    g.add_argument("--limit", type=positive(), help="stop after this many rows")
    g.add_argument(
        "--source",
        choices=("original", "thumbnail", "mirror"),
        default="original",
        help="original: OriginalURL (verified against OriginalSize/OriginalMD5); thumbnail: Thumbnail300KURL, "
        "falling back to OriginalURL where missing (not checksummed: regenerated on the fly); mirror: the CVDF "
        "mirror's 1024-px copies at MIRROR_BASE_URL/<split>/<ImageID>.jpg",
    )
    g.add_argument("--mirror-base-url", default=SourceConfig.mirror_base_url, help="base URL of the mirror")
    g.add_argument("--retry-failed", action="store_true", help="redo rows that failed in an earlier run")
    g.add_argument(
        "--originals-dir",
        action="append",
        default=[],
        type=Path,
        metavar="DIR",
        help="originals already on disk (original/ layout, with or without 3-letter subdirectories), repeatable: "
        "a row whose file is there and matches OriginalSize/OriginalMD5 (where the list has them) is processed "
        "from disk without any network, e.g. to re-resize a dataset with new variants offline",
    )
    g.add_argument(
        "--check-md5-if-exists",
        action="store_true",
        help="an original already in OUT/original that matches the list is not fetched again",
    )

    g = p.add_argument_group("output")
    g.add_argument("--db", type=Path, help="state database (default: OUT/oidl.sqlite)")
    g.add_argument("--sizes", default="", help="shorthand for variants: comma-separated longest sides, e.g. 256,512")
    g.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="SPEC",
        help="an output variant SIZE[:MODE][:FORMAT][:qN][:progressive][:subsample=on|off], repeatable; "
        "e.g. 256, 512:fill-crop:webp:q80, 224x224:fill-distort. Modes: shrink, fill-crop, fill-distort, pad",
    )
    g.add_argument("--quality", type=int, default=DEFAULT_QUALITY, help="default encoder quality (1-100)")
    g.add_argument("--save-originals", action="store_true", help="keep the downloaded files under OUT/original/")
    g.add_argument("--no-subdirs", action="store_true", help="no 3-letter subdirectories: OUT/<variant>/<ImageID>.<ext>")
    g.add_argument(
        "--png",
        choices=("convert", "keep", "discard"),
        default="convert",
        help="PNG sources: convert to the variant's format, keep as PNG, or discard (row fails png_discarded)",
    )
    g.add_argument("--background", type=_rgb, default=(255, 255, 255), help="colour for alpha flattening and pad")
    g.add_argument(
        "--apply-rotation",
        action="store_true",
        help="apply the Open Images Rotation column (v4+) after EXIF orientation",
    )
    g.add_argument("--max-pixels", type=positive(), default=100_000_000, help="pixel cap (decompression bombs)")
    g.add_argument(
        "--strict",
        action="store_true",
        help="any decoder warning fails the image as corrupt (default: an image that decodes completely is ok, "
        "e.g. a JPEG with 'Corrupt JPEG data' warnings)",
    )
    g.add_argument("--durable", action="store_true", help="fsync every file before its row is committed")
    g.add_argument(
        "--tmp-dir",
        type=Path,
        help="temporary files, renamed into place when complete; must be on the same filesystem as --out. "
        "The run empties it at start and end, so runs writing into one --out at the same time each need "
        "their own (default: OUT/.oidl-tmp)",
    )

    g = p.add_argument_group("format and annotations")
    g.add_argument(
        "--format",
        choices=("files", "webdataset", "tfrecord", "parquet"),
        default="files",
        help="files: one file per image and variant; webdataset: tar shards (PyTorch); tfrecord: tf.train.Example "
        "shards with the TF Object Detection API's keys; parquet: one row per image. Shards go to "
        "OUT/<variant>/NNNNN.<tar|tfrecord|parquet> (an _NNNNN.json index beside each), and appear only once complete",
    )
    g.add_argument("--shard-size", type=positive(), default=OutputConfig.shard_rows,
                   help="images per shard (all variants are cut together)")
    g.add_argument("--shard-bytes", type=_byte_size, default="1G",
                   help="also cut when one shard reaches this size (e.g. 512M, 2G; 0: no limit)")
    g.add_argument(
        "--annotations",
        metavar="TARGET",
        help="annotations database (oidl-engine db import: SQLite path or postgresql:// URL): attach each image's "
        "boxes, labels, segmentations (with mask PNGs), relationships and points to its sample; with --format "
        "files, writes <ImageID>.json beside each image (and the web UI's gallery draws the boxes)",
    )
    g.add_argument("--metadata-dir", type=Path,
                   help="where the release's mask zips are (default: the annotations database's directory)")

    g = p.add_argument_group("processes")
    g.add_argument("--procs", type=positive(), default=os.cpu_count() or 1, help="pyvips worker processes")
    g.add_argument(
        "--cells",
        type=positive(),
        help="routing cells: each a supervisor with its own fetchers, workers and writer, taking the rows whose "
        "ImageID hashes to it, so nothing per image runs in a single process. Default: one per 4 --procs "
        "(never more than --max-host-connections, whose share each cell gets)",
    )
    g.add_argument("--fetchers", type=positive(), default=1, help="fetcher processes per cell (one drives thousands of transfers)")
    g.add_argument(
        "--transfers",
        type=positive(),
        default=FetchConfig.transfers,
        help="most transfers in flight per fetcher. No need to tune it: the fetcher keeps as many in flight as "
        "keep the workers busy (measured download time x the workers' measured rate, with headroom), within "
        "--ring-mb and the connection caps, and follows them as hosts or workers speed up or slow down; the "
        "progress line shows the current target. Lower it only to be gentler on your own network",
    )
    g.add_argument(
        "--ring-mb",
        type=positive(),
        default=RingConfig.fetch_slots * RingConfig.slot_bytes // (1024 * 1024),
        help="most shared memory per fetcher for bodies in flight or waiting for workers, MiB. Only the part "
        "the current transfer target needs is used (and given back when the target falls); this cap bounds "
        "the target when bodies are large: a transfer starts only when the ring can promise room for its "
        "expected body (OriginalSize, else the mean so far), and takes the pages as bytes arrive. Lowered "
        "at start, with a warning, to what /dev/shm has free (in a container: docker run --shm-size=2g)",
    )

    g = p.add_argument_group("network")
    g.add_argument("--max-connections", type=positive(), default=FetchConfig.max_connections,
                   help="total connections, all hosts (a cap on the transfer target too)")
    g.add_argument(
        "--max-host-connections", type=positive(), default=FetchConfig.max_host_connections, help="connections per host"
    )
    g.add_argument("--connect-timeout", type=positive(float), default=FetchConfig.connect_timeout_s, help="seconds")
    g.add_argument(
        "--low-speed-time",
        type=positive(float),
        default=FetchConfig.low_speed_time_s,
        help="abort a transfer below --low-speed-limit for this many seconds (stalled server)",
    )
    g.add_argument("--low-speed-limit", type=positive(), default=FetchConfig.low_speed_bps, help="bytes/second")
    g.add_argument("--timeout", type=positive(float), default=FetchConfig.timeout_s, help="deadline of one attempt, s")
    g.add_argument("--max-redirects", type=_nonneg_int, default=FetchConfig.max_redirects, help="http/https redirects")
    g.add_argument("--max-retries", type=_nonneg_int, default=FetchConfig.max_retries, help="retries of transient failures")
    g.add_argument("--retry-base", type=positive(float), default=FetchConfig.retry_base_s, help="first retry delay, s")
    g.add_argument("--max-bytes", type=positive(), default=FetchConfig.max_body_bytes, help="body size cap, bytes")
    g.add_argument("--user-agent", default=FetchConfig.user_agent, help="User-Agent header")
    g.add_argument(
        "--resolve",
        action="append",
        default=[],
        metavar="HOST:PORT:ADDR",
        help="pin a host name to an address (libcurl RESOLVE), repeatable",
    )
    g.add_argument("--no-verify", action="store_true", help="do not check OriginalSize/OriginalMD5")
    g.add_argument("--insecure", action="store_true", help="accept TLS certificates that do not verify")

    g = p.add_argument_group("monitoring")
    g.add_argument("--metrics-port", type=_nonneg_int, help="serve Prometheus metrics on this port")
    g.add_argument("--metrics-host", default="127.0.0.1", help="address for --metrics-port")
    g.add_argument("--ui", choices=("auto", "plain", "tui", "web", "none"), default="auto",
                   help="auto: tui on a terminal, else plain lines")
    g.add_argument("--web-port", type=_nonneg_int, help="serve the live web UI on this port")
    g.add_argument("--web-host", default="127.0.0.1", help="address for --web-port")
    g.add_argument("-v", "--verbose", action="store_true", help="log more")

    g = p.add_argument_group(
        "Ray cluster (pip install 'oidl-engine[ray]')",
        "With --ray this machine drives the run and the cluster's nodes do the work: the lists are cut\n"
        "into shards, each shard runs the engine on one node (its cores, or --procs) writing into --out,\n"
        "which every node must see at the same path (a shared mount), and the state DB here records\n"
        "every row. A shard lost with its node, or whose engine fails, is retried; the other options\n"
        "apply on every node.",
    )
    g.add_argument(
        "--ray",
        nargs="?",
        const="auto",
        metavar="ADDRESS",
        help="run over a Ray cluster: 'auto' (the default when ADDRESS is left out: the cluster this machine "
        "joined with 'ray start'), HOST:PORT of the head, ray://HOST:10001 (Ray Client), or 'local' (start "
        "Ray on this machine only)",
    )
    g.add_argument(
        "--ray-shard-rows",
        type=positive(),
        default=5000,
        metavar="N",
        help="rows per shard (one Ray task): larger shards start the engine less often, smaller ones redo "
        "less work when a node is lost",
    )
    g.add_argument(
        "--ray-max-retries",
        type=_nonneg_int,
        default=3,
        metavar="N",
        help="retries of a shard whose node died or whose engine failed; then its rows fail as task_failed",
    )
    g.add_argument(
        "--ray-node-metrics-port",
        type=_nonneg_int,
        metavar="PORT",
        help="each node's engine also serves its own Prometheus /metrics on this port of the node's address "
        "(the driver's --metrics-port shows the cluster's totals and per-node rates)",
    )
    g.add_argument("--ray-dashboard", action="store_true",
                   help="start Ray's dashboard (only with --ray local; a cluster's is set by 'ray start')")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="oidl-engine",
        description="Download, verify, convert and package Open Images (and any image URL list).",
        formatter_class=_Formatter,
    )
    p.add_argument("--version", action="version", version=f"oidl-engine {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    run = sub.add_parser(
        "run",
        help="download and process image lists",
        formatter_class=_Formatter,
        description="Download every row of the lists, verify it, decode it, write the requested variants, and "
        "record every row in the state DB. Run the same command again to resume.",
        epilog=RUN_EXIT_STATUS,
    )
    _add_run_options(run)
    run.set_defaults(run_parser=run)

    demo = sub.add_parser(
        "demo",
        help="self-contained demo: loopback server + generated list",
        formatter_class=_Formatter,
        description="Generate photo-like images (and a few broken ones), serve them on 127.0.0.1, write an "
        "Open Images-format list pointing at them, and run the engine on it. No internet needed.",
    )
    demo.add_argument("--out", type=Path, default=Path("demo-out"), help="output directory")
    demo.add_argument("-n", "--images", type=positive(), default=200, help="number of images")
    demo.add_argument("--broken", type=_nonneg_int, default=6, help="how many of them are broken")
    demo.add_argument("--sizes", default="256,512", help="variants to make")
    demo.add_argument("--procs", type=positive(), default=os.cpu_count() or 1, help="worker processes")
    demo.add_argument("--ui", choices=("auto", "plain", "tui", "web", "none"), default="auto", help="progress display")
    demo.add_argument("--metrics-port", type=_nonneg_int, help="serve Prometheus metrics on this port")
    demo.add_argument("--web-port", type=_nonneg_int, help="serve the live web UI on this port")

    res = sub.add_parser(
        "results",
        help="write images-success.csv and images-failure.csv",
        formatter_class=_Formatter,
        description="From the state DB, write images-success.csv (the input lists' own columns) and "
        "images-failure.csv (the same plus reason and detail).",
    )
    res.add_argument("out", type=Path, help="the run's output directory")
    res.add_argument("--db", type=Path, help="state database (default: OUT/oidl.sqlite)")
    res.add_argument("--dest", type=Path, help="where to write the CSVs (default: OUT)")

    for module in _command_modules():
        module.register(sub)
    return p


def _command_modules() -> list:
    """Subcommands that live in their own modules: each has ``COMMANDS``, ``register(sub)`` and ``run(args)``."""
    from .meta import download, export, importer, select

    return [download, importer, select, export]


def config_from_args(a: argparse.Namespace) -> RunConfig:
    """Turn parsed options into the frozen run config; raises ValueError with a user message."""
    variants = list(parse_sizes(a.sizes, default_quality=a.quality)) if a.sizes else []
    for spec in a.variant:
        variants.append(parse_variant(spec, default_quality=a.quality))
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"the same variant is asked for twice: {', '.join(names)}")
    if not 1 <= a.quality <= 100:
        raise ValueError("--quality must be between 1 and 100")
    out: Path = a.out
    slot_bytes = RingConfig.slot_bytes
    fetch = FetchConfig(
        fetchers=a.fetchers,
        transfers=a.transfers,
        max_connections=a.max_connections,
        max_host_connections=a.max_host_connections,
        connect_timeout_s=a.connect_timeout,
        low_speed_bps=a.low_speed_limit,
        low_speed_time_s=a.low_speed_time,
        timeout_s=a.timeout,
        max_redirects=a.max_redirects,
        max_retries=a.max_retries,
        retry_base_s=a.retry_base,
        max_body_bytes=a.max_bytes,
        user_agent=a.user_agent,
        verify=not a.no_verify,
        resolve=tuple(a.resolve),
        insecure=a.insecure,
    )
    ring_slots = max(1, a.ring_mb * 1024 * 1024 // slot_bytes)
    if ring_slots * slot_bytes < 2 * a.max_bytes:
        raise ValueError(f"--ring-mb {a.ring_mb} must hold at least two bodies of --max-bytes {a.max_bytes}")
    from .sinks import FormatUnavailable, check_format
    from .sinks.annotations import AnnotationSource, AnnotationsError

    try:
        check_format(a.format)
    except FormatUnavailable as e:
        raise ValueError(str(e)) from None
    if a.annotations:
        try:
            AnnotationSource(a.annotations, a.metadata_dir).close()  # fail now, clearly, not in the writer
        except AnnotationsError as e:
            raise ValueError(f"--annotations: {e}") from None
    if a.metadata_dir is not None and not a.metadata_dir.is_dir():
        raise ValueError(f"--metadata-dir {a.metadata_dir} is not a directory")
    ui = a.ui
    if ui == "auto":
        ui = "tui" if sys.stdout.isatty() else "plain"
    return RunConfig(
        lists=tuple(a.lists),
        output=OutputConfig(
            out_dir=out,
            db_path=a.db or out / "oidl.sqlite",
            subdirs=not a.no_subdirs,
            save_originals=a.save_originals,
            durable=a.durable,
            tmp_path=a.tmp_dir,
            format=a.format,
            shard_rows=a.shard_size,
            shard_bytes=a.shard_bytes,
            annotations=a.annotations,
            metadata_dir=a.metadata_dir,
            rotation_applied=a.apply_rotation,
        ),
        fetch=fetch,
        source=SourceConfig(
            source=a.source,
            mirror_base_url=a.mirror_base_url,
            originals_dirs=tuple(a.originals_dir) + ((out / "original",) if a.check_md5_if_exists else ()),
        ),
        pipeline=PipelineConfig(
            variants=tuple(variants),
            max_pixels=a.max_pixels,
            png=a.png,
            background_rgb=a.background,
            apply_rotation=a.apply_rotation,
            strict=a.strict,
        ),
        ring=RingConfig(slot_bytes=slot_bytes, fetch_slots=ring_slots),
        workers=a.procs,
        cells=a.cells,
        subset=a.subset,
        limit=a.limit,
        retry_failed=a.retry_failed,
        metrics_host=a.metrics_host,
        metrics_port=a.metrics_port,
        ui=ui,
        web_host=a.web_host,
        web_port=a.web_port,
    )


#: options the --ray driver handles itself instead of forwarding to the engine on each node
_DRIVER_ONLY = frozenset({
    "lists", "out", "db", "tmp_dir", "ui", "metrics_port", "metrics_host", "web_port", "web_host", "verbose",
    "limit", "retry_failed", "procs", "help", "ray", "ray_shard_rows", "ray_max_retries", "ray_node_metrics_port",
    "ray_dashboard",
})


def forwarded_args(run_parser: argparse.ArgumentParser, a: argparse.Namespace) -> list[str]:
    """The run's options that differ from their defaults, as command-line arguments for each node's engine.

    Built from the parser itself, so an option added to ``run`` later is forwarded without a change here.
    """
    out: list[str] = []

    def text(v: object) -> str:
        if isinstance(v, Path):
            return str(v.absolute())  # the nodes do not share the driver's working directory
        return ",".join(map(str, v)) if isinstance(v, tuple) else str(v)

    for act in run_parser._actions:
        if act.dest in _DRIVER_ONLY or not act.option_strings:
            continue
        value = getattr(a, act.dest, None)
        if value is None or value == act.default:
            continue
        opt = act.option_strings[-1]
        if isinstance(act, argparse._StoreTrueAction):
            out.append(opt)
        elif isinstance(act, argparse._AppendAction):
            for v in value:
                out += [opt, text(v)]
        else:
            out += [opt, text(value)]
    return out


def _run_on_ray(a: argparse.Namespace, cfg: RunConfig, argv: Sequence[str]) -> int:
    from .dist.ray_run import RayConfig, run_on_ray

    explicit_procs = any(x == "--procs" or x.startswith("--procs=") for x in argv)
    rcfg = RayConfig(
        address=a.ray,
        shard_rows=a.ray_shard_rows,
        max_retries=a.ray_max_retries,
        dashboard=a.ray_dashboard,
        cpus_per_task=a.procs if explicit_procs else None,
        node_metrics_port=a.ray_node_metrics_port,
        engine_args=tuple(forwarded_args(a.run_parser, a)),
    )
    return run_on_ray(cfg, rcfg)


def run_engine(cfg: RunConfig) -> int:
    """Run with the configured UI; returns the exit code."""
    from .cells import make_run
    from .inputs import ListError
    from .report import PlainReporter, summary_text
    from .supervisor import RunError

    from .monitor import Monitor, MonitorError

    reporter = PlainReporter(every_s=cfg.progress_line_s) if cfg.ui == "plain" else None
    # TUI, web UI and exporter run in their own process, out of the supervisor's way.
    monitor = Monitor.for_run(cfg)

    def tick(sup) -> None:  # noqa: ANN001 - a Supervisor or a CellRun: both have .stats
        if reporter is not None:
            reporter.tick(sup.stats)
        if monitor is not None:
            monitor.attach(sup.stats.layout)

    sup = make_run(cfg, on_tick=tick)
    try:
        if monitor is not None:
            try:
                urls = monitor.start()
            except MonitorError as e:
                print(f"oidl-engine: cannot start monitoring: {e}", file=sys.stderr)
                return EXIT_USAGE
            for what, url in urls.items():
                print(f"oidl-engine: {what} on {url}", file=sys.stderr, flush=True)
        summary = sup.run()
    except ListError as e:
        print(f"oidl-engine: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RunError as e:
        print(f"oidl-engine: {e}", file=sys.stderr)
        return EXIT_RUN_ERROR
    finally:
        if monitor is not None:
            monitor.stop()  # before the summary: the TUI gives the terminal back first
    if cfg.ui != "none":
        print(summary_text(summary.ok, summary.failed, summary.skipped, summary.reasons, summary.elapsed_s,
                           summary.interrupted, summary.broken_lists), file=sys.stderr)
    if summary.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_INCOMPLETE if summary.broken_lists else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(a, "verbose", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("pyvips").setLevel(logging.ERROR)
    try:
        if a.command == "run":
            try:
                cfg = config_from_args(a)
            except ValueError as e:
                parser.error(str(e))
            given = sys.argv[1:] if argv is None else list(argv)
            if a.ray is not None:
                if cfg.output.sharded:  # every node would number its own tars 00000, 00001, ... in one --out
                    parser.error(f"--ray writes --format files only (not {cfg.output.format}) for now")
                return _run_on_ray(a, cfg, given)
            stray = [x for x in given if x.startswith("--ray-")]
            if stray:
                parser.error(f"{stray[0].split('=')[0]} needs --ray")
            return run_engine(cfg)
        if a.command == "demo":
            from .demo import run_demo

            return run_demo(a)
        if a.command == "results":
            from .results import write_results

            return write_results(a.out, a.db, a.dest)
        for module in _command_modules():
            if a.command in module.COMMANDS:
                return module.run(a)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK
    parser.error(f"unknown command {a.command}")
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
