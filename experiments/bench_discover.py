"""Wall time of ``lens-attn discover`` per stage, at chosen thread counts.

    python experiments/bench_discover.py --out runs/bench_discover                     # bundled
    python experiments/bench_discover.py --model /tmp/smollm2-hf --threads 1 --out runs/bench_smol
    python experiments/bench_discover.py --threads 0 1 --out runs/bench_discover       # 0: torch's default

Each run is a fresh ``lens-attn discover`` process (imports and model loading included), with
``OMP_NUM_THREADS`` and ``--threads`` set to the count (0 leaves both unset). It prints the command's
wall time and the per-stage times from its ``run.json``, and writes ``bench_discover.json``.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def run_once(model: str | None, threads: int, out: Path) -> dict:
    env = dict(os.environ, MPLBACKEND="Agg")
    cmd = [sys.executable, "-m", "lens_attn.cli", "discover", "--out", str(out)]
    if model:
        cmd += ["--model", model]
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
        cmd += ["--threads", str(threads)]
    else:
        env.pop("OMP_NUM_THREADS", None)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    info = json.loads((out / "run.json").read_text())
    plan = [line for line in proc.stdout.splitlines() if line.startswith(("confirm plan", "  at "))]
    return {"threads": threads or "default", "wall_s": wall, "timings": info.get("timings_s"),
            "plan": plan}  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model source (default: the bundled one)")
    parser.add_argument("--threads", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    results = []
    for threads in args.threads:
        r = run_once(args.model, threads, args.out / f"threads_{threads or 'default'}")
        print(f"threads {r['threads']}: {r['wall_s']:.1f}s wall; stages {r['timings']}")
        results.append(r)
    path = args.out / "bench_discover.json"
    path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
