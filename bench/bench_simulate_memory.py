"""Peak memory and throughput of `cryoai simulate` for a large particle count.

Runs the simulator in a child process and reports its peak resident memory (ru_maxrss) and
images/s. The images go to disk (n * L^2 * 4 bytes: 16 GiB for 1,000,000 at L=64).

Example: python bench/bench_simulate_memory.py --n 1000000 --box 64 --outdir /tmp/sim1m
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--outdir", required=True)
    p.add_argument("--keep", action="store_true", help="keep the simulated files")
    args = p.parse_args()
    cmd = [sys.executable, "-m", "cryoai.cli.main", "simulate", "--n", str(args.n), "--box", str(args.box),
           "--snr-db", "-10", "--shift-sigma-a", "10", "--outdir", args.outdir, "--force", "--quiet"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(f"simulate n={args.n} L={args.box}: {seconds:.0f} s, {args.n / seconds:.0f} images/s, "
          f"peak RSS {peak_kib / 1024**2:.2f} GiB")
    if not args.keep:
        shutil.rmtree(args.outdir, ignore_errors=True)


if __name__ == "__main__":
    main()
