"""Fit, test and plot the inference-time scaling law of arXiv 2411.03312:

    error(N, V) = A * N^(-alpha) * V^(-beta) + D

N: LLM parameters (billions), V: visual tokens per image, error: 1 - accuracy averaged over a
benchmark suite. Inference cost: FLOPs = 2 N (Q + V + G), with Q text tokens (0 when the prompt
is cached) and G generated tokens.

The release samples 20% of a 5,000,000-point grid in random order: about 7 minutes, a different
answer on each run, no uncertainty. This script evaluates the whole grid exactly (for fixed alpha
and beta the SSE is a quadratic in A and D, so five sums per (alpha, beta) replace 28 residuals
per grid point), refines continuously inside the same box (scipy's bounded least squares),
bootstraps the (N, V) cells for 95% intervals, finds the compute-optimal (N, V), checks
extrapolation and draws the plots. The fitting itself is in scaling_law.py.

  python 04_fit_scaling.py --paper
  python 04_fit_scaling.py --scores runs/eval/results.jsonl --suite gqa,pope
  python 04_fit_scaling.py --paper --budget 1e11 --text-tokens 50
  python 04_fit_scaling.py --paper --holdout-largest --no-plots
"""
import argparse
import csv
import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from scaling_law import (N_RANGE, PAPER_BOX, PARAMS, TEXT_LENGTHS, VALID_TOKENS, BadInput, Cells, best_config, bootstrap,
                         budget_query, check_identifiable, edge_warnings, fit_full_grid, fit_law, holdout_largest,
                         inference_flops, interval, law, on_edge, optimal_tokens_continuous, optimal_tokens_table,
                         optimal_tokens_valid)

PROG = "04_fit_scaling.py"
PUBLISHED = Path(__file__).resolve().parent / "published"
PAPER_DATA = {"reasoning": PUBLISHED / "paper_visual_reasoning.csv", "ocr": PUBLISHED / "paper_ocr.csv"}
PLOTTED_TEXT_LENGTHS = (0, 50)  # the paper's Figure 1a (cached text) and 1b


# -----------------------------------------------------------------------------
# arguments

def parse_range(text):
    """NAME=LO:HI for --range, e.g. alpha=0:0.4."""
    try:
        name, bounds = text.split("=")
        lo, hi = (float(b) for b in bounds.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=LO:HI")
    if name not in PARAMS:
        raise argparse.ArgumentTypeError(f"{name!r} is not one of {', '.join(PARAMS)}")
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo < hi):
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 <= LO < HI (a negative D or exponent is meaningless)")
    return name, lo, hi


def non_negative_int(text):
    if int(text) < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return int(text)


def positive_float(text):
    if not (math.isfinite(float(text)) and float(text) > 0):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return float(text)


def parse_args(argv):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--scores", metavar="FILE", help="CSV or JSONL rows: params_b, tokens and score (accuracy in "
                      "[0, 1]) or normalized + benchmark (03_evaluate.py's results.jsonl)")
    data.add_argument("--paper", nargs="?", const="reasoning", choices=sorted(PAPER_DATA),
                      help="the paper's 28 published averages: visual reasoning (the default) or ocr (Fig. 3b; "
                           "two apparent slips in the release, see published/paper_ocr.csv)")
    p.add_argument("--suite", metavar="NAMES", help="comma-separated benchmark names to average (default: all in the file)")
    p.add_argument("--compressor", metavar="NAME", help="keep the rows of this compressor (needed when the file has several)")
    p.add_argument("--range", action="append", type=parse_range, default=[], metavar="NAME=LO:HI",
                   help="move a parameter's search range (repeatable); default: the release's grid")
    p.add_argument("--bootstrap", type=non_negative_int, default=1000, metavar="N", help="resamples for the 95%% intervals (0: none)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--generated-tokens", type=non_negative_int, default=0, metavar="G", help="G in 2N(Q + V + G)")
    p.add_argument("--budget", type=positive_float, metavar="FLOPS", help="print the best (N, V) within this budget")
    p.add_argument("--text-tokens", type=non_negative_int, default=0, metavar="Q", help="Q for --budget")
    p.add_argument("--holdout-largest", action="store_true", help="fit without the largest N, report its prediction error")
    p.add_argument("--output-dir", default="out/fit_scaling", metavar="DIR", help="fit.json and the plots go here")
    p.add_argument("--no-plots", action="store_true")
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# load: rows -> one averaged error per (N, V) cell

def read_records(path):
    """(line number, row dict) for every data line of a CSV or JSONL file; lines starting with # are comments."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # a spreadsheet's byte-order mark is not a column name
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"{path}: cannot read the file ({getattr(e, 'strerror', None) or e})")
    lines = [(i, line) for i, line in enumerate(text.splitlines(), 1) if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise BadInput(f"{path}: no data rows")
    if lines[0][1].lstrip()[0] in "{[":  # JSON Lines; anything else is read as CSV
        return [(i, parse_json_line(path, i, line)) for i, line in lines]
    header_line, header = lines[0][0], [h.strip() for h in next(csv.reader([lines[0][1]]))]
    records = []
    for i, line in lines[1:]:
        values = next(csv.reader([line]))
        if len(values) != len(header):
            raise BadInput(f"{path}, line {i}: {len(values)} fields, but the header (line {header_line}) has {len(header)}")
        records.append((i, dict(zip(header, (v.strip() for v in values)))))
    if not records:
        raise BadInput(f"{path}: a header but no data rows")
    return records


def parse_json_line(path, i, line):
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadInput(f"{path}, line {i}: not valid JSON ({e.msg})")
    if not isinstance(row, dict):
        raise BadInput(f"{path}, line {i}: expected a JSON object")
    return row


def select_records(records, path, suite, compressor):
    """Keep one compressor's rows (averaging several would mix different models) and the chosen benchmarks."""
    compressors = sorted({str(row["compressor"]) for _, row in records if "compressor" in row})
    if compressor is not None:
        records = [(i, row) for i, row in records if str(row.get("compressor")) == compressor]
        if not records:
            raise BadInput(f"{path}: no rows with compressor {compressor!r} (the file has: {', '.join(compressors) or 'none'})")
    elif len(compressors) > 1:
        raise BadInput(f"{path}: rows from several compressors ({', '.join(compressors)}): pick one with --compressor")
    if suite is None:
        return records
    if any("benchmark" not in row for _, row in records):
        line = next(i for i, row in records if "benchmark" not in row)
        raise BadInput(f"{path}, line {line}: --suite needs a benchmark column, this row has none")
    wanted = {name.strip().lower() for name in suite.split(",") if name.strip()}
    present = {str(row["benchmark"]).lower() for _, row in records}
    if wanted - present:
        raise BadInput(f"{path}: no rows for benchmark(s) {', '.join(sorted(wanted - present))} "
                       f"(the file has: {', '.join(sorted(present))})")
    return [(i, row) for i, row in records if str(row["benchmark"]).lower() in wanted]


def number(row, column, where):
    value = row[column]
    try:
        if isinstance(value, bool):
            raise ValueError
        x = float(value)
    except (TypeError, ValueError):
        raise BadInput(f"{where}: {column} = {value!r} is not a number")
    if not math.isfinite(x):
        raise BadInput(f"{where}: {column} = {value!r} is not finite")
    return x


def average_cells(records, path):
    """Validate every row and average each (N, V) cell over its benchmarks. Rows that name a training
    seed (toy/demo.py --seeds) also give Cells.seeds, one point per (N, V, seed) averaged over its
    rows, so the bootstrap can redraw the seeds of each cell. Returns (Cells, warnings)."""
    # results.jsonl carries raw metrics (MME ~1500) in score and [0, 1] values in normalized: prefer those.
    value_column = "normalized" if any("normalized" in row for _, row in records) else "score"
    needed = ("params_b", "tokens", value_column) + (("benchmark",) if value_column == "normalized" else ())
    per_cell = defaultdict(lambda: defaultdict(list))  # (N, V) -> benchmark -> values
    rows_of = defaultdict(int)  # (N, V, benchmark, seed) -> rows
    per_seed = defaultdict(list)  # (N, V, seed) -> values
    for i, row in records:
        where = f"{path}, line {i}"
        missing = [c for c in needed if c not in row]
        if missing:
            raise BadInput(f"{where}: missing column(s) {', '.join(missing)} (the row has: {', '.join(row) or 'nothing'}); "
                           "rows need params_b, tokens and score (accuracy in [0, 1]) or normalized with benchmark")
        n, v, s = (number(row, c, where) for c in ("params_b", "tokens", value_column))
        if n <= 0:
            raise BadInput(f"{where}: params_b = {n:g} must be positive (billions of LLM parameters)")
        if v <= 0:
            raise BadInput(f"{where}: tokens = {v:g} must be positive (visual tokens per image)")
        if not 0 <= s <= 1:
            raise BadInput(f"{where}: {value_column} = {s:g} is outside [0, 1] (an accuracy)")
        per_cell[(n, v)][str(row.get("benchmark", ""))].append(s)
        rows_of[(n, v, str(row.get("benchmark", "")), row.get("seed"))] += 1
        per_seed[(n, v, str(row.get("seed")))].append(s)

    warnings = []
    repeated = sum(count > 1 for count in rows_of.values())  # several seeds of one cell are replicates, not repeats
    if repeated:
        warnings.append(f"{path}: {repeated} (N, V, benchmark) combinations appear on several rows: their values are averaged")
    suites = {cell: frozenset(by_benchmark) for cell, by_benchmark in per_cell.items()}
    all_benchmarks = frozenset().union(*suites.values())
    uneven = {cell: all_benchmarks - names for cell, names in suites.items() if names != all_benchmarks}
    if uneven:
        examples = "; ".join(f"N={n:g} V={v:g} lacks {', '.join(sorted(lack))}" for (n, v), lack in sorted(uneven.items())[:4])
        warnings.append(f"{path}: cells cover different benchmark sets, so their averages are not comparable "
                        f"({len(uneven)} of {len(suites)} cells incomplete: {examples})")

    cells = sorted(per_cell)
    accuracy = [np.mean([np.mean(values) for values in per_cell[cell].values()]) for cell in cells]
    benchmarks = sorted(b for b in all_benchmarks if b)
    averaged = Cells(np.array([c[0] for c in cells]), np.array([c[1] for c in cells]),
                     1 - np.array(accuracy), str(path), benchmarks)
    if len(per_seed) > len(cells):  # several seeds in some cell: replicates to redraw
        keys = sorted(per_seed)
        averaged.seeds = Cells(np.array([k[0] for k in keys]), np.array([k[1] for k in keys]),
                               1 - np.array([np.mean(per_seed[k]) for k in keys]), str(path), benchmarks)
        averaged.seed_cell = np.array([cells.index(k[:2]) for k in keys])
    return averaged, warnings


def load_cells(path, suite, compressor):
    records = select_records(read_records(path), path, suite, compressor)
    cells, warnings = average_cells(records, path)
    check_identifiable(cells)
    return cells, warnings


# -----------------------------------------------------------------------------
# plots

def save_plots(cells, fit, boot, G, out_dir):
    """Each figure as .png and .pdf; returns the .png paths."""
    import matplotlib  # here, not at the top: --no-plots runs skip its ~1 s import
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = {f"scaling_q{Q}": plot_error_vs_flops(plt, cells, fit, boot, Q, G) for Q in PLOTTED_TEXT_LENGTHS}
    figures["optimal_tokens"] = plot_optimal_tokens(plt, fit, boot, G)
    for stem, fig in figures.items():
        for suffix in (".png", ".pdf"):
            fig.savefig(out_dir / f"{stem}{suffix}", dpi=150)
        plt.close(fig)
    return [out_dir / f"{stem}.png" for stem in figures]


def marker_size(V):
    return np.interp(np.log(V), [0, np.log(VALID_TOKENS[-1])], [18, 260])


def ci_text(boot, name):
    return "" if boot is None else " [{:.3g}, {:.3g}]".format(*interval(boot[name]))


def plot_error_vs_flops(plt, cells, fit, boot, Q, G):
    """The paper's Figure 1a (Q = 0) / 1b (Q = 50): data, fitted curves, compute-optimal frontier."""
    fig, ax = plt.subplots(figsize=(9.5, 5.5), layout="constrained")
    sizes = np.unique(cells.N)
    colors = plt.get_cmap("plasma")(np.linspace(0.0, 0.8, len(sizes)))
    curve_V = np.geomspace(1, VALID_TOKENS[-1], 200)
    for N, color in zip(sizes, colors):
        at = cells.N == N
        ax.scatter(inference_flops(N, cells.V[at], Q, G), cells.error[at], s=marker_size(cells.V[at]),
                   color=color, edgecolor="black", linewidth=0.5, zorder=3)
        ax.plot(inference_flops(N, curve_V, Q, G), law(fit, N, curve_V), color=color, lw=2, label=f"N = {N:g}B")

    budgets = np.geomspace(inference_flops(N_RANGE[0], 1, Q, G), inference_flops(N_RANGE[1], VALID_TOKENS[-1], Q, G), 400)
    N_opt, V_opt, error_opt = best_config(fit, budgets, Q, G)
    # Stop where the optimum reaches the largest LLM: past it, budgets buy tokens only because N is capped.
    last = np.argmax(N_opt >= N_RANGE[1]) if (N_opt >= N_RANGE[1]).any() else len(budgets) - 1
    used = ", ".join(str(v) for v in sorted(set(V_opt[:last + 1].tolist())))
    ax.plot(budgets[:last + 1], error_opt[:last + 1], color="black", ls=":", lw=2.5,
            label=f"compute-optimal\nN = {N_RANGE[0]:g}B to {N_RANGE[1]:g}B\nV = {used}")

    ax.set_xscale("log")
    ax.set_xlabel(f"inference FLOPs = 2N(Q + V{' + G' if G else ''}),  Q = {Q}{f', G = {G}' if G else ''}")
    ax.set_ylabel("average downstream error")
    cached = " (cached text)" if Q == 0 else ""
    ax.set_title(f"Q = {Q} text tokens{cached}:  α = {fit['alpha']:.4f}{ci_text(boot, 'alpha')},  "
                 f"β = {fit['beta']:.4f}{ci_text(boot, 'beta')}", fontsize=11)
    ax.grid(True, which="both", alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=9, title="fitted law", title_fontsize=9)
    token_handles = [ax.scatter([], [], s=marker_size(v), color="lightgray", edgecolor="black", linewidth=0.5)
                     for v in VALID_TOKENS]
    fig.legend(token_handles, [str(v) for v in VALID_TOKENS], loc="outside right lower", fontsize=9,
               title="visual tokens V", title_fontsize=9, labelspacing=1.1, borderpad=0.9)
    return fig


def plot_optimal_tokens(plt, fit, boot, G):
    """The paper's Figure 3a: compute-optimal visual tokens against text tokens."""
    fig, ax = plt.subplots(figsize=(7, 4.8), layout="constrained")
    Q = np.linspace(0, TEXT_LENGTHS[-1], 401)
    ax.plot(Q, optimal_tokens_continuous(fit["alpha"], fit["beta"], Q, G), color="tab:blue", lw=2,
            label="optimal V (continuous)")
    if boot is not None:
        band = optimal_tokens_continuous(boot["alpha"][:, None], boot["beta"][:, None], Q[None], G)
        low, high = np.quantile(band, [0.025, 0.975], axis=0, method="inverted_cdf")
        ax.fill_between(Q, low, high, color="tab:blue", alpha=0.2, label="95% bootstrap interval")
    valid = [optimal_tokens_valid(fit["alpha"], fit["beta"], q, G)[0] for q in Q]
    ax.step(Q, valid, where="post", color="tab:red", lw=1.5, label=f"best V in {{{', '.join(map(str, VALID_TOKENS))}}}")
    ax.set_xlabel(f"text tokens Q{f'  (G = {G} generated)' if G else ''}")
    ax.set_ylabel("compute-optimal visual tokens V")
    ax.set_title(f"Optimal V = β(Q + G)/(α − β),  α/β = {fit['ratio']:.2f}{ci_text(boot, 'ratio')}", fontsize=11)
    ax.set_xlim(0, Q[-1])
    ax.set_ylim(0, None)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize=9)
    return fig


# -----------------------------------------------------------------------------
# report and save

def describe(p):
    return (f"A = {p['A']:.4f}  alpha = {p['alpha']:.5f}  beta = {p['beta']:.5f}  D = {p['D']:.4f}  "
            f"alpha/beta = {p['ratio']:.3f}  SSE = {p['sse']:.4e}  R^2 = {p['r2']:.4f}")


def json_ready(value):
    """inf (a ratio with beta = 0) is not JSON: write null."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def warn(warnings, *messages):
    for message in messages:
        print(f"warning: {message}", file=sys.stderr)
        warnings.append(message)


def print_intervals(fit, boot, cells, resamples, seconds):
    seeds = f" and of the seeds within each ({len(cells.seeds.N)} runs)" if cells.seeds is not None else ""
    print(f"bootstrap: {resamples} resamples of the {len(cells.N)} cells{seeds} in {seconds:.2f} s; "
          "95% intervals:")
    for name in PARAMS + ("ratio",):
        (lo, hi), label = interval(boot[name]), "alpha/beta" if name == "ratio" else name
        print(f"  {label:<10} {fit[name]:.4g}  [{lo:.4g}, {hi:.4g}]")


def print_optimal_tokens(table, with_intervals, G):
    print(f"compute-optimal visual tokens (any budget where the optimal N stays within {N_RANGE[0]:g}B-{N_RANGE[1]:g}B; "
          f"G = {G}):")
    print(f"  {'Q':>4}  {'V* continuous':<24}  best V in {{{', '.join(map(str, VALID_TOKENS))}}}")
    for row in table:
        ci = " [{:.3g}, {:.3g}]".format(*row["v_star_ci"]) if with_intervals else ""
        valid_ci = " [{}, {}]".format(*row["best_valid_v_ci"]) if with_intervals else ""
        print(f"  {row['text_tokens']:>4}  {row['v_star']:<6.3g}{ci:<18}  {row['best_valid_v']}{valid_ci}")


def print_holdout(holdout):
    print(f"holdout: fitted without N = {holdout['held_out_params_b']:g}B ({describe(holdout['fit'])})")
    for c in holdout["cells"]:
        print(f"  V = {c['tokens']:>4g}: observed error {c['observed_error']:.4f}, predicted "
              f"{c['predicted_error']:.4f}, relative error {100 * c['relative_error']:.2f}%")
    print(f"  mean relative error {100 * holdout['mean_relative_error']:.2f}%, "
          f"max {100 * holdout['max_relative_error']:.2f}%")


def run(args):
    # load
    warnings, out_dir = [], Path(args.output_dir)
    try:  # made before the fit, so that an unusable --output-dir fails at once
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInput(f"{out_dir}: cannot create the output directory ({e.strerror})")
    cells, load_warnings = load_cells(PAPER_DATA[args.paper] if args.paper else args.scores, args.suite, args.compressor)
    warn(warnings, *load_warnings)
    box = {**PAPER_BOX, **{name: (lo, hi, PAPER_BOX[name][2]) for name, lo, hi in args.range}}  # ends only
    print(f"data: {cells.source}: {len(cells.N)} cells, N = {', '.join(f'{n:g}' for n in np.unique(cells.N))} B, "
          f"V = {', '.join(f'{v:g}' for v in np.unique(cells.V))}"
          + (f", benchmarks: {', '.join(cells.benchmarks)}" if cells.benchmarks else ""))

    # fit: the whole grid exactly, then the continuous refinement inside the same box
    start = time.perf_counter()
    grid = fit_full_grid(cells, box)
    fit = fit_law(cells, box)
    fit_seconds = time.perf_counter() - start
    grid_points = math.prod(b[2] for b in box.values())
    # the grid optimum is the release-comparable number: the median of what its unseeded 20% search finds
    print(f"grid optimum ({grid_points:,} points, the release's number): {describe(grid)}")
    print(f"refined (continuous, fit.json's top level):    {describe(fit)}")
    print(f"fit time: {fit_seconds:.3f} s")
    warn(warnings, *edge_warnings(grid, box, "grid optimum"), *edge_warnings(fit, box, "refined fit"))

    # bootstrap
    boot = None
    if args.bootstrap:
        start = time.perf_counter()
        boot = bootstrap(cells, box, args.bootstrap, args.seed)
        print_intervals(fit, boot, cells, args.bootstrap, time.perf_counter() - start)

    # compute-optimal analysis
    G = args.generated_tokens
    table = optimal_tokens_table(fit, boot, G)
    print_optimal_tokens(table, boot is not None, G)
    budget = None
    if args.budget is not None:
        budget = budget_query(fit, args.budget, args.text_tokens, G)
        print(f"budget {args.budget:.3g} FLOPs at Q = {args.text_tokens}: N = {budget['params_b']:.3g}B, "
              f"V = {budget['tokens']}, predicted error {budget['predicted_error']:.4f} "
              f"(uses {budget['flops_used']:.3g} FLOPs)")
        if budget["params_b"] == N_RANGE[1]:
            warn(warnings, f"the budget affords more than the largest LLM considered ({N_RANGE[1]:g}B): "
                           "its leftover goes to tokens")
    if N_RANGE[1] > cells.N.max():
        print(f"note: the analysis goes up to N = {N_RANGE[1]:g}B; above {cells.N.max():g}B it extrapolates the law")

    # extrapolation check
    holdout = None
    if args.holdout_largest:
        holdout = holdout_largest(cells, box)
        print_holdout(holdout)
        warn(warnings, *edge_warnings(holdout["fit"], box, "holdout fit"))

    # plots
    if not args.no_plots:
        print(f"plots: {', '.join(map(str, save_plots(cells, fit, boot, G, out_dir)))} (and .pdf)")

    # save
    result = {**fit, "grid": grid, "fit_seconds": fit_seconds, "source": cells.source, "n_cells": len(cells.N),
              "benchmarks": cells.benchmarks, "box": {name: list(b) for name, b in box.items()},
              "generated_tokens": G, "optimal_v": table, "on_edge": on_edge(fit, box), "warnings": warnings}
    if boot is not None:
        result.update({f"{name}_ci": interval(boot[name]) for name in PARAMS + ("ratio",)})
        result.update(bootstrap=args.bootstrap, seed=args.seed, bootstrap_seed_runs=0 if cells.seeds is None else len(cells.seeds.N))
    if budget is not None:
        result["budget"] = budget
    if holdout is not None:
        result["holdout"] = holdout
    (out_dir / "fit.json").write_text(json.dumps(json_ready(result), indent=2) + "\n")
    print(f"wrote {out_dir / 'fit.json'}")
    return result


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except BadInput as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
