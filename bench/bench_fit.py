"""Benchmark: 04_fit_scaling.py's exact fit against the release's pure-Python grid search.

The release (locuslab/llava-token-compression, scaling_law_code/objective.py)
shuffles the 5,000,000-point grid and loops over it in Python, one tqdm update
and description per point, stopping after 20 percent. Running that for real
takes ~7 minutes (20%) or ~35 (100%), so this script times the same loop on a
random sample of grid points and extrapolates linearly: every grid point costs
the same 28 residuals. It times the loop twice, with the release's progress
bar (written to /dev/null, so no terminal cost) and bare, and reports the
speed-up against both.

Ours: the whole grid, exactly, then the continuous refinement, i.e. what
04_fit_scaling.py reports as "fit time", best and median of --repeats runs.

  python bench/bench_fit.py --out out/bench_fit.json
"""
import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # not through common.py: this bench needs no torch
import scaling_law as sl  # noqa: E402

spec = importlib.util.spec_from_file_location("fit_scaling", ROOT / "04_fit_scaling.py")
fs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fs)


def release_grid(seed):
    """The release's grid, built and shuffled the way it does it."""
    a, b, c, d = (np.linspace(lo, hi, points) for lo, hi, points in sl.PAPER_BOX.values())
    grid = np.array(np.meshgrid(a, b, c, d)).T.reshape(-1, 4)
    np.random.default_rng(seed).shuffle(grid)
    return grid


def release_law(params, inputs):
    """The release's model function: unpacks both arguments on every call."""
    a, b, c, d = params
    n, token = inputs
    return a * 1 / n ** b * 1 / (token ** c) + d


def release_loop(grid, scores, n_values, token_values, progress):
    """The release's search loop, statement for statement: numpy-scalar parameters, a function call and a
    dict-and-index look-up per residual."""
    bar = tqdm(total=len(grid), file=open(os.devnull, "w")) if progress else None
    best_loss, best_params = 1000000, None
    for param in grid:
        loss = 0
        for n in n_values:
            for token in token_values:
                prediction = release_law(param, [n, token])
                error = 1 - scores[str(n)][token_values.index(token)]
                loss += (prediction - error) ** 2
        if loss < best_loss:
            best_loss, best_params = loss, param
        if progress:
            bar.update(1)
            bar.set_description("best loss: {} : best params : {}".format(best_loss, best_params))
    return best_loss, best_params


def time_release(cells, grid, progress):
    n_values = sorted({float(n) if n % 1 else int(n) for n in cells.N})
    token_values = sorted({int(v) for v in cells.V})
    scores = {str(n): [1 - cells.error[(cells.N == n) & (cells.V == v)][0] for v in token_values] for n in n_values}
    start = time.perf_counter()
    release_loop(grid, scores, n_values, token_values, progress)
    return len(grid) / (time.perf_counter() - start)


def time_ours(cells, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        grid = sl.fit_full_grid(cells, sl.PAPER_BOX)
        fit = sl.fit_law(cells, sl.PAPER_BOX)
        times.append(time.perf_counter() - start)
    return times, grid, fit


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sample", type=int, default=10_000, help="grid points the pure-Python loop is timed on")
    p.add_argument("--repeats", type=int, default=7, help="runs of our fit")
    p.add_argument("--out", default="out/bench_fit.json")
    args = p.parse_args()

    cells, _ = fs.load_cells(fs.PAPER_DATA["reasoning"], None, None)
    points = int(np.prod([b[2] for b in sl.PAPER_BOX.values()]))
    start = time.perf_counter()
    sample = release_grid(seed=0)[:args.sample]
    grid_build = time.perf_counter() - start
    rate_bar = time_release(cells, sample, progress=True)
    rate_bare = time_release(cells, sample, progress=False)
    times, grid, fit = time_ours(cells, args.repeats)
    ours = statistics.median(times)

    release_20 = 0.2 * points / rate_bar
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}",
        "grid_points": points, "sample": args.sample,
        "release_points_per_s_with_progress_bar": rate_bar, "release_points_per_s_bare": rate_bare,
        "release_grid_build_s": grid_build,
        "release_20pct_s_extrapolated": release_20, "release_full_s_extrapolated": points / rate_bar,
        "ours_s_median": ours, "ours_s_best": min(times), "ours_s_first": times[0], "repeats": args.repeats,
        "speedup_vs_release_20pct": release_20 / ours,
        "speedup_vs_release_20pct_bare_loop": 0.2 * points / rate_bare / ours,
        "speedup_vs_release_full_grid": points / rate_bar / ours,
        "grid_optimum": grid, "refined": fit,
    }

    print(f"machine: {result['machine']}")
    print(f"release loop, timed on {args.sample:,} of {points:,} grid points and extrapolated:")
    print(f"  {'':<34}{'points/s':>10}{'20% search':>13}{'full grid':>13}")
    for label, rate in (("with its tqdm bar (as released)", rate_bar), ("bare loop, no progress bar", rate_bare)):
        print(f"  {label:<34}{rate:>10,.0f}{0.2 * points / rate:>12.0f}s{points / rate:>12.0f}s")
    print(f"  (+ {grid_build:.2f} s to build and shuffle the grid, not counted)")
    print(f"ours, whole grid exactly + refinement: median {ours:.3f} s, best {min(times):.3f} s, "
          f"first {times[0]:.3f} s over {args.repeats} runs")
    print(f"speed-up vs the release's 20% search: {result['speedup_vs_release_20pct']:,.0f}x "
          f"({result['speedup_vs_release_20pct_bare_loop']:,.0f}x vs its bare loop); "
          f"vs its full grid: {result['speedup_vs_release_full_grid']:,.0f}x")
    print(f"grid optimum: alpha {grid['alpha']:.4f} beta {grid['beta']:.4f} SSE {grid['sse']:.4e}; "
          f"refined: alpha {fit['alpha']:.4f} beta {fit['beta']:.4f} SSE {fit['sse']:.4e}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
