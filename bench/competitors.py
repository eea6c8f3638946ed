"""What the engine is compared with: img2dataset (in its own venv) and wrk / curl --parallel.

img2dataset is installed into ``bench/.venv-i2d`` on demand (``ensure_img2dataset``), never into
the engine's venv: it pins old albumentations/opencv/pyarrow versions we do not want to ship with.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from .measure import RunResult, run_measured

BENCH_DIR = Path(__file__).resolve().parent
I2D_VENV = BENCH_DIR / ".venv-i2d"
I2D_VERSION = "1.47.0"  # the version the published ratios were measured against
I2D_THREADS_PER_PROC = 32  # 2 procs x 32 threads = 64 downloads in flight, as the engine's host cap


def img2dataset_binary() -> Path | None:
    exe = I2D_VENV / "bin" / "img2dataset"
    return exe if exe.exists() else None


def ensure_img2dataset() -> Path:
    """The img2dataset executable, creating its venv first if needed (a few minutes, once)."""
    exe = img2dataset_binary()
    if exe is not None:
        return exe
    base_python = getattr(sys, "_base_executable", None) or shutil.which("python3") or sys.executable
    subprocess.run([base_python, "-m", "venv", str(I2D_VENV)], check=True)
    subprocess.run(
        [str(I2D_VENV / "bin" / "pip"), "install", "-q", f"img2dataset=={I2D_VERSION}"],
        check=True,
    )
    exe = img2dataset_binary()
    if exe is None:
        raise RuntimeError(f"img2dataset did not install into {I2D_VENV}")
    return exe


def run_img2dataset(
    urls: Sequence[str], out_dir: Path, size: int, quality: int, procs: int
) -> tuple[RunResult, int]:
    """One img2dataset run over ``urls`` at one size; (measurement, successes)."""
    exe = img2dataset_binary()
    if exe is None:
        raise FileNotFoundError("img2dataset is not installed (run without --no-img2dataset to install it)")
    out_dir.mkdir(parents=True, exist_ok=True)
    url_list = out_dir / "urls.txt"
    url_list.write_text("\n".join(urls) + "\n")
    target = out_dir / "out"
    shutil.rmtree(target, ignore_errors=True)
    # Shards are img2dataset's unit of parallelism: one shard per process would leave a core
    # idle at the end, so ~4 shards per process.
    per_shard = max(1, math.ceil(len(urls) / (4 * procs)))
    cmd = [
        str(exe),
        f"--url_list={url_list}",
        "--input_format=txt",
        f"--output_folder={target}",
        "--output_format=files",
        f"--processes_count={procs}",
        f"--thread_count={I2D_THREADS_PER_PROC}",
        f"--image_size={size}",
        "--resize_mode=keep_ratio_largest",
        "--resize_only_if_bigger=True",  # the engine's shrink mode never upscales either
        f"--encode_quality={quality}",
        f"--number_sample_per_shard={per_shard}",
        "--compute_hash=md5",  # the engine computes (and checks) MD5
        "--timeout=30",
        "--retries=0",
        "--enable_wandb=False",
        "--distributor=multiprocessing",
    ]
    env = {"NO_ALBUMENTATIONS_UPDATE": "1", "PATH": "/usr/bin:/bin", "HOME": str(out_dir)}
    result = run_measured(cmd, env=env, cwd=out_dir)
    successes = 0
    for stats in target.glob("*_stats.json"):
        try:
            successes += int(json.loads(stats.read_text()).get("successes", 0))
        except (OSError, ValueError):
            continue
    return result, successes


_WRK_LUA = """
local paths = {}
for line in io.lines("%s") do paths[#paths + 1] = line end
local i = 0
request = function()
  i = i %% #paths + 1
  return wrk.format("GET", paths[i])
end
"""


def run_wrk(base_url: str, paths: Sequence[str], duration_s: float, connections: int) -> dict[str, float] | None:
    """Requests/s of wrk (one thread, so one core) cycling over ``paths``; None without wrk."""
    wrk = shutil.which("wrk")
    if wrk is None:
        return None
    with tempfile.TemporaryDirectory(prefix="oidl-bench-wrk-") as tmp:
        listing = Path(tmp) / "paths.txt"
        listing.write_text("\n".join(paths) + "\n")
        script = Path(tmp) / "cycle.lua"
        script.write_text(_WRK_LUA % listing)
        out = subprocess.run(
            [wrk, "-t1", f"-c{connections}", f"-d{max(1, round(duration_s))}s", "-s", str(script), base_url],
            capture_output=True,
            text=True,
            timeout=duration_s + 30,
        ).stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    return {"requests_per_s": float(m.group(1))} if m else None


def run_curl_parallel(urls: Sequence[str], connections: int) -> dict[str, float] | None:
    """Requests/s of one ``curl --parallel`` process over ``urls`` (the fallback without wrk)."""
    curl = shutil.which("curl")
    if curl is None:
        return None
    with tempfile.TemporaryDirectory(prefix="oidl-bench-curl-") as tmp:
        config = Path(tmp) / "urls.cfg"
        config.write_text("".join(f'url = "{u}"\noutput = "/dev/null"\n' for u in urls))
        result = run_measured(
            [curl, "-s", "--parallel", f"--parallel-max={connections}", "-K", str(config)],
        )
    return {"requests_per_s": len(urls) / result.wall_s, "cpu_us_per_request": 1e6 * result.cpu_s / len(urls)}
