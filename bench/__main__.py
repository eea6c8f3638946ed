"""``python -m bench run [--scenario NAME|all] [--smoke] [--images N] ...``: run the benchmark."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from .harness import RESULTS_DIR, SCENARIOS, BenchConfig, run


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description="oidl-engine throughput benchmark")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run scenarios and write JSON + a table of ratios")
    r.add_argument("--scenario", action="append", choices=(*SCENARIOS, "db-import", "all"),
                   help="repeatable; default all (the image scenarios; db-import runs only when named)")
    r.add_argument("--db-rows", type=int, default=3_000_000,
                   help="db-import: rows of the generated boxes file (default %(default)s)")
    r.add_argument("--smoke", action="store_true", help="tiny corpus, seconds: checks the harness, not the engine")
    r.add_argument("--images", type=int, help="images for one-size (default 6000)")
    r.add_argument("--three-sizes-images", type=int, help="images for three-sizes (default 2000)")
    r.add_argument("--slow-images", type=int, help="images for slow-hosts (default 12000)")
    r.add_argument("--big-list-rows", type=int, help="rows of the big list (default 2000000)")
    r.add_argument("--big-list-seconds", type=float, help="run window on the big list (default 45)")
    r.add_argument("--fetch-images", type=int, help="small files for fetch-only (default 5000)")
    r.add_argument("--scale-images", type=int, help="images for scale-out (default 3000)")
    r.add_argument("--shard-images", type=int, help="images for shards (default 3000)")
    r.add_argument("--procs", type=int, help="worker processes for every tool (default 2)")
    r.add_argument("--no-img2dataset", action="store_true", help="skip img2dataset (never installed then)")
    r.add_argument("--server", choices=("nginx", "loopback"), default="nginx")
    r.add_argument("--work-dir", type=Path, help="corpora and outputs (default bench/results/work; smoke: a temp dir)")
    r.add_argument("--json", type=Path, help="result file (default bench/results/<time>.json and latest.json)")
    return p


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM (or SIGINT where a shell ignored it) stops servers and runs cleanly


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    args = _parser().parse_args(argv)
    scenarios = list(SCENARIOS) if not args.scenario or "all" in args.scenario else list(dict.fromkeys(args.scenario))
    if "db-import" in scenarios:
        # its own run: a boxes file and two databases, no image corpus or file server
        if args.db_rows <= 0:
            print("error: --db-rows must be positive", file=sys.stderr)
            return 2
        from .dbimport import scenario_db_import, table

        work = args.work_dir or RESULTS_DIR / "work"
        result = scenario_db_import(work / "db-import", args.db_rows, log=lambda m: print(m, flush=True))
        result["table"] = table(result)
        where = args.json or RESULTS_DIR / time.strftime("db-import-%Y%m%d-%H%M%S.json")
        where.parent.mkdir(parents=True, exist_ok=True)
        where.write_text(json.dumps(result, indent=1))
        print()
        print(result["table"])
        print(f"\nresults: {where}")
        scenarios.remove("db-import")
        if not scenarios:
            return 0
    tmp: tempfile.TemporaryDirectory[str] | None = None
    if args.smoke:
        if args.work_dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="oidl-bench-smoke-")
        work = args.work_dir or Path(tmp.name)  # type: ignore[union-attr]
        # img2dataset only if it is already installed: a smoke run never installs anything.
        from .competitors import img2dataset_binary

        cfg = BenchConfig.smoke_config(work, img2dataset=not args.no_img2dataset and img2dataset_binary() is not None)
    else:
        cfg = BenchConfig(work_dir=args.work_dir or RESULTS_DIR / "work", img2dataset=not args.no_img2dataset)
    overrides = {
        "images": args.images, "three_sizes_images": args.three_sizes_images, "slow_images": args.slow_images, "big_list_rows": args.big_list_rows,
        "big_list_run_s": args.big_list_seconds, "fetch_images": args.fetch_images, "procs": args.procs,
        "scale_images": args.scale_images,
        "shard_images": args.shard_images,
    }
    from dataclasses import replace

    cfg = replace(cfg, server=args.server, **{k: v for k, v in overrides.items() if v is not None})
    if args.images is not None:
        cfg = replace(cfg, ceiling_sample=max(cfg.ceiling_sample, min(args.images, 2000)))
    for name, value in overrides.items():
        if value is not None and value <= 0:
            print(f"error: --{name.replace('_', '-')} must be positive", file=sys.stderr)
            return 2
    try:
        results = run(cfg, scenarios, log=lambda m: print(m, flush=True))
    finally:
        if tmp is not None:
            tmp.cleanup()
    text = json.dumps(results, indent=1)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
        where = args.json
    else:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        where = RESULTS_DIR / time.strftime("%Y%m%d-%H%M%S.json")
        where.write_text(text)
        (RESULTS_DIR / ("latest-smoke.json" if args.smoke else "latest.json")).write_text(text)
    print()
    print(results["table"])
    print(f"\nresults: {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
