"""``oidl-engine demo``: the first thing a newcomer runs. No internet needed.

Generates photo-like JPEGs (and a few broken files), serves them from a loopback HTTP
server, writes an Open Images-format list pointing at them, runs the engine on it with the
same code path as ``run``, and prints where the results are.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import OutputConfig, RunConfig
from .corpus import make_corpus, write_openimages_list
from .loopback import LoopbackServer
from .variants import PipelineConfig, parse_sizes


def run_demo(a: argparse.Namespace) -> int:
    from .cli import run_engine

    out: Path = a.out.resolve()
    corpus_dir = out / "corpus"
    print(f"generating {a.images} photo-like images ({a.broken} broken) in {corpus_dir} ...", file=sys.stderr)
    items = make_corpus(corpus_dir, a.images, broken=min(a.broken, a.images))
    ui = a.ui if a.ui != "auto" else ("tui" if sys.stdout.isatty() else "plain")
    with LoopbackServer(corpus_dir) as server:
        list_path = out / "images.csv"
        write_openimages_list(list_path, items, server.base_url)
        print(f"serving them on {server.base_url}; list: {list_path}", file=sys.stderr)
        cfg = RunConfig(
            lists=(str(list_path),),
            output=OutputConfig(out_dir=out / "result", db_path=out / "result" / "oidl.sqlite", save_originals=True),
            pipeline=PipelineConfig(variants=parse_sizes(a.sizes)),
            workers=a.procs,
            ui=ui,
            metrics_port=a.metrics_port,
            web_port=a.web_port,
        )
        code = run_engine(cfg)
    result = out / "result"
    print(
        f"\nresults in {result}:\n"
        f"  originals   {result / 'original'}\n"
        + "".join(f"  {v.name:<11} {result / v.name}\n" for v in cfg.pipeline.variants)
        + f"  state DB    {cfg.output.db_path}  (sqlite3 {cfg.output.db_path} 'select status, reason, count(*) "
        f"from images group by 1, 2')\n"
        f"  CSVs        oidl-engine results {result}",
        file=sys.stderr,
    )
    return code
