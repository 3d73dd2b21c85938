"""The inference-time scaling law of arXiv 2411.03312, error(N, V) = A N^-alpha V^-beta + D: its fit,
bootstrap and compute-optimal analysis. 04_fit_scaling.py reads the scores, calls these and reports.
"""
import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares
from tqdm import tqdm

PARAMS = ("A", "alpha", "beta", "D")
# The release's grid (scaling_law_code/objective.py; docs/sources.md): (low, high, points).
# --range moves the ends, never the resolution.
PAPER_BOX = {"A": (0.2, 0.7, 50), "alpha": (0.0, 0.2, 100), "beta": (0.0, 0.05, 100), "D": (0.0, 0.3, 10)}
VALID_TOKENS = np.array([1, 4, 16, 36, 64, 144, 576])  # what the compressor can produce from 24x24 patches
N_RANGE = (0.5, 20.0)  # LLM sizes (billions) the compute-optimal search may pick
TEXT_LENGTHS = (0, 10, 50, 100, 200)
REFINE_TOLERANCE = 1e-15  # least_squares' xtol, ftol and gtol: it stops where float64 does
BASIS_ELEMENTS = 1 << 22  # N^-alpha V^-beta values held at once: 32 MB, whatever the number of cells


class BadInput(Exception):
    """Input the script refuses: 04_fit_scaling.py prints it as one line and exits with status 2."""


@dataclass
class Cells:
    """The points the law is fitted to, one per (N, V) cell."""
    N: np.ndarray  # LLM parameters, billions
    V: np.ndarray  # visual tokens
    error: np.ndarray  # 1 - accuracy averaged over the cell's benchmarks
    source: str  # the file, for messages
    benchmarks: list  # the benchmark names averaged ([] when the file names none)
    # rows with a seed column (training replicates): Cells of one point per (N, V, seed), and each point's cell
    seeds: object = None
    seed_cell: np.ndarray = None

    def subset(self, keep):
        return Cells(self.N[keep], self.V[keep], self.error[keep], self.source, self.benchmarks)


def shortfalls(N, V, distinct):
    """What keeps cells from pinning down the law's 4 parameters, one exponent per axis: fewer distinct
    cells than parameters, a single LLM size, a single token count. Along the last axis, so that the
    same rule answers for the data and for each bootstrap resample."""
    return distinct < len(PARAMS), (N == N[..., :1]).all(-1), (V == V[..., :1]).all(-1)


def check_identifiable(cells, what=""):
    few, one_size, one_count = shortfalls(cells.N, cells.V, len(cells.N))
    where = f"{cells.source}{what}"
    if few:
        raise BadInput(f"{where}: only {len(cells.N)} distinct (N, V) cells, fewer than the law's "
                       f"{len(PARAMS)} parameters (A, alpha, beta, D)")
    if one_size:
        raise BadInput(f"{where}: every row has params_b = {cells.N[0]:g}; alpha (the LLM-size exponent) "
                       "needs at least two LLM sizes")
    if one_count:
        raise BadInput(f"{where}: every row has tokens = {cells.V[0]:g}; beta (the visual-token exponent) "
                       "needs at least two token counts")
    if np.ptp(cells.error) == 0:
        raise BadInput(f"{where}: every cell has error {cells.error[0]:g}; the law needs errors that "
                       "vary with N or V (were the models trained and evaluated?)")


# -----------------------------------------------------------------------------
# fit

def law(p, N, V):
    return p["A"] * N ** -p["alpha"] * V ** -p["beta"] + p["D"]


def moments(alpha, beta, logN, logV, W, y):
    """The weighted sums the SSE needs, for each (alpha, beta) (K,) and each weight column of W (n, B):
    (K, B). Summed over the cells in chunks of at most BASIS_ELEMENTS basis values x = N^-alpha V^-beta,
    so memory stays bounded however many cells there are."""
    sums, step = {}, max(1, BASIS_ELEMENTS // alpha.size)
    for start in range(0, len(y), step):
        part = slice(start, start + step)
        X, w = np.exp(-(alpha[:, None] * logN[part] + beta[:, None] * logV[part])), W[part]
        chunk = {"Sx": X @ w, "Sxx": (X * X) @ w, "Sxy": X @ (w * y[part, None])}
        sums = {k: sums.get(k, 0) + v for k, v in chunk.items()}
    Wy = W * y[:, None]
    return {**sums, "S": W.sum(0), "Sy": Wy.sum(0), "Syy": (Wy * y[:, None]).sum(0)}


def quadratic_sse(m, A, D):
    """sum w (A x + D - y)^2, expanded so that it costs the same for one data point or a thousand."""
    return A * (A * m["Sxx"] + 2 * (D * m["Sx"] - m["Sxy"])) + D * (D * m["S"] - 2 * m["Sy"]) + m["Syy"]


def fit_full_grid(cells, box, alpha_chunk=10):
    """The exact optimum of the release's 4-D grid, every point evaluated, in chunks of alpha to bound memory."""
    logN, logV, y = np.log(cells.N), np.log(cells.V), cells.error
    A, alphas, betas, D = (np.linspace(*box[name]) for name in PARAMS)
    best = (np.inf, None)
    for start in range(0, len(alphas), alpha_chunk):
        alpha, beta = (g.ravel() for g in np.meshgrid(alphas[start:start + alpha_chunk], betas, indexing="ij"))
        m = {k: v[..., None] for k, v in moments(alpha, beta, logN, logV, np.ones((len(y), 1)), y).items()}
        sse = quadratic_sse(m, A[:, None], D[None, :])  # (alpha x beta, A, D)
        k, i, j = np.unravel_index(sse.argmin(), sse.shape)
        if sse[k, i, j] < best[0]:
            best = (sse[k, i, j], {"A": A[i], "alpha": alpha[k], "beta": beta[k], "D": D[j]})
    return with_goodness(best[1], cells)


def solve_amplitude_and_floor(m, box):
    """Least-squares A and D inside the box for fixed (alpha, beta), in closed form.

    The SSE is a convex quadratic in (A, D), so its minimum over the box is the free minimum when
    that lies inside, else the best of the four edge minima (each a 1-D solve, clipped). Returns
    A, D and SSE shaped like the moments."""
    (a_lo, a_hi, _), (d_lo, d_hi, _) = box["A"], box["D"]
    Sx, Sxx, Sxy, S, Sy = (m[k] for k in ("Sx", "Sxx", "Sxy", "S", "Sy"))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        det = Sxx * S - Sx * Sx  # 0 at alpha = beta = 0, where A and D act as one number
        A = (S * Sxy - Sx * Sy) / det
        D = (Sy - A * Sx) / S
        inside = (det > 0) & (a_lo <= A) & (A <= a_hi) & (d_lo <= D) & (D <= d_hi)
        best = [np.where(inside, A, np.nan), np.where(inside, D, np.nan),
                np.where(inside, quadratic_sse(m, A, D), np.inf)]
    edges = [(a, np.clip((Sy - a * Sx) / S, d_lo, d_hi)) for a in (a_lo, a_hi)]
    edges += [(np.clip((Sxy - d * Sx) / Sxx, a_lo, a_hi), d) for d in (d_lo, d_hi)]
    for A, D in edges:
        sse = quadratic_sse(m, A, D)
        best = [np.where(sse < best[2], new, old) for new, old in zip((A, D, sse), best)]
    return best


def refine(start, logN, logV, w, y, box):
    """Bounded least squares on all four parameters from start (A, alpha, beta, D): scipy's dogbox
    method, which leaves a parameter exactly on its bound (D = 0 is 0) and accepts no worse step."""
    sqrt_w = np.sqrt(w)
    low, high = (np.array([box[name][i] for name in PARAMS]) for i in (0, 1))

    def residuals(p):
        return sqrt_w * (p[0] * np.exp(-p[1] * logN - p[2] * logV) + p[3] - y)

    def jacobian(p):
        x = np.exp(-p[1] * logN - p[2] * logV)
        return sqrt_w[:, None] * np.stack([x, -p[0] * logN * x, -p[0] * logV * x, np.ones_like(x)], 1)

    return least_squares(residuals, start, jac=jacobian, bounds=(low, high), method="dogbox", x_scale=high - low,
                         xtol=REFINE_TOLERANCE, ftol=REFINE_TOLERANCE, gtol=REFINE_TOLERANCE).x


def fit_continuous(cells, box, W):
    """Least squares inside the box, one fit per weight column of W (ones: the plain fit; counts: bootstrap).

    Each starts at the best point of the release's 100 x 100 (alpha, beta) grid with A and D solved
    exactly there (never worse than the whole 4-D grid's optimum), then refine() moves all four."""
    logN, logV, y = np.log(cells.N), np.log(cells.V), cells.error
    alpha, beta = (g.ravel() for g in np.meshgrid(np.linspace(*box["alpha"]), np.linspace(*box["beta"]), indexing="ij"))
    A, D, sse = solve_amplitude_and_floor(moments(alpha, beta, logN, logV, W, y), box)
    k, columns = sse.argmin(0), np.arange(W.shape[1])
    starts = np.stack([A[k, columns], alpha[k], beta[k], D[k, columns]], 1)
    fits = np.array([refine(start, logN, logV, w, y, box) for start, w in zip(starts, W.T)])
    return dict(zip(PARAMS, fits.T))


def with_goodness(p, cells):
    """Parameters as floats plus SSE (recomputed directly, not from the expanded quadratic) and R^2."""
    p = {name: float(p[name]) for name in PARAMS}
    residual = law(p, cells.N, cells.V) - cells.error
    sse = float(residual @ residual)
    spread = cells.error - cells.error.mean()
    total = float(spread @ spread)  # 0 only in a bootstrap resample of identical errors: R^2 undefined
    return {**p, "ratio": p["alpha"] / p["beta"] if p["beta"] > 0 else math.inf,
            "sse": sse, "r2": 1 - sse / total if total > 0 else math.nan}


def fit_law(cells, box):
    one = fit_continuous(cells, box, np.ones((len(cells.N), 1)))
    return with_goodness({name: values[0] for name, values in one.items()}, cells)


def on_edge(p, box):
    """{parameter: "lower" or "upper"} for every value sitting on an edge of its range."""
    return {name: side for name in PARAMS for side, bound in zip(("lower", "upper"), box[name][:2])
            if abs(p[name] - bound) <= 1e-6 * (box[name][1] - box[name][0])}


def edge_warnings(p, box, label):
    """An optimum on the box's edge is the box's answer, not the data's: say so."""
    warnings = []
    for name, side in on_edge(p, box).items():
        lo, hi, _ = box[name]
        why = (f"widen it with --range {name}=LO:HI" if not (name == "D" and side == "lower") else
               "the fit would push the irreducible error below 0, which is meaningless (left free, the law "
               "degenerates to a log-linear one with alpha -> 0 and a huge A), so D is held at 0")
        warnings.append(f"{label}: {name} = {p[name]:.4g} sits on the {side} edge of its range [{lo:g}, {hi:g}]; {why}")
    return warnings


# -----------------------------------------------------------------------------
# bootstrap: resample the cells with replacement, refit each resample

def bootstrap_weights(cells, resamples, seed):
    """Resamples as counts per cell (n, resamples); ones that cannot identify the law are drawn again."""
    rng, n = np.random.default_rng(seed), len(cells.N)
    idx = rng.integers(0, n, (resamples, n))
    for _ in range(1000):
        distinct = (np.diff(np.sort(idx, axis=1), axis=1) != 0).sum(1) + 1
        bad = np.any(shortfalls(cells.N[idx], cells.V[idx], distinct), axis=0)
        if not bad.any():
            break
        idx[bad] = rng.integers(0, n, (bad.sum(), n))
    else:
        raise BadInput(f"{cells.source}: too few cells to bootstrap (resamples keep losing an N or a V); use --bootstrap 0")
    W = np.zeros((n, resamples))
    np.add.at(W, (idx, np.arange(resamples)[:, None]), 1)
    return W


def seed_weights(cells, W, seed):
    """Cell draws W (cells, resamples) -> weights on cells.seeds: a cell drawn c times draws c x k
    of its k seeds with replacement, each weighing 1/k. Least squares on these weights is the fit
    to the drawn cells' means of drawn seeds (the squared distance to k points weighing 1/k each is
    the distance to their mean plus a constant), so one weighted fit per resample does it."""
    rng = np.random.default_rng([seed, 1])
    weights = np.zeros((len(cells.seeds.N), W.shape[1]))
    for j in range(len(cells.N)):
        mine = np.flatnonzero(cells.seed_cell == j)
        weights[mine] = rng.multinomial(W[j].astype(int) * len(mine), np.full(len(mine), 1 / len(mine))).T / len(mine)
    return weights


def bootstrap(cells, box, resamples, seed, chunk=100):
    W = bootstrap_weights(cells, resamples, seed)
    if cells.seeds is not None:  # the intervals include the training noise: each drawn cell redraws its seeds
        cells, W = cells.seeds, seed_weights(cells, W, seed)
    fits = []
    with tqdm(total=resamples, desc="bootstrap", unit="fit", leave=False) as bar:
        for start in range(0, resamples, chunk):  # chunks bound the (grid x resamples) arrays to ~10 MB each
            fits.append(fit_continuous(cells, box, W[:, start:start + chunk]))
            bar.update(fits[-1]["A"].size)
    boot = {name: np.concatenate([f[name] for f in fits]) for name in PARAMS}
    with np.errstate(divide="ignore"):
        boot["ratio"] = np.where(boot["beta"] > 0, boot["alpha"] / boot["beta"], np.inf)
    return boot


def interval(samples):
    """95% percentile interval; actual sample values, so discrete V stays in its set and inf stays inf."""
    return [float(q) for q in np.quantile(samples, [0.025, 0.975], method="inverted_cdf")]


# -----------------------------------------------------------------------------
# compute-optimal analysis

def inference_flops(N, V, Q, G):
    return 2e9 * N * (Q + V + G)


def optimal_tokens_continuous(alpha, beta, Q, G):
    """Budget-free optimal V. At fixed FLOPs, N = F / 2(Q + V + G), so error - D is proportional to
    (Q + V + G)^alpha V^-beta, smallest at V = beta (Q + G) / (alpha - beta); clipped to [1, 576]."""
    alpha, beta = np.asarray(alpha, float), np.asarray(beta, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        v = np.where(alpha > beta, beta * (Q + G) / (alpha - beta), np.inf)  # alpha <= beta: tokens always pay
    return np.clip(v, VALID_TOKENS[0], VALID_TOKENS[-1])


def optimal_tokens_valid(alpha, beta, Q, G):
    """The best V the compressor can produce, by the same budget-free criterion."""
    V = VALID_TOKENS[:, None]
    cost = np.atleast_1d(alpha)[None] * np.log(Q + G + V) - np.atleast_1d(beta)[None] * np.log(V)
    return VALID_TOKENS[cost.argmin(0)]


def best_config(p, budgets, Q, G):
    """Lowest predicted error within each budget: for each valid V the largest N in range it affords."""
    V = VALID_TOKENS[:, None]
    N = np.minimum(N_RANGE[1], np.atleast_1d(budgets)[None] / inference_flops(1, V, Q, G))
    error = np.where(N >= N_RANGE[0], law(p, N, V), np.inf)
    k, columns = error.argmin(0), np.arange(N.shape[1])
    return N[k, columns], VALID_TOKENS[k], error[k, columns]


def optimal_tokens_table(fit, boot, G):
    rows = []
    for Q in TEXT_LENGTHS:
        row = {"text_tokens": Q, "v_star": float(optimal_tokens_continuous(fit["alpha"], fit["beta"], Q, G)),
               "best_valid_v": int(optimal_tokens_valid(fit["alpha"], fit["beta"], Q, G)[0])}
        if boot is not None:
            row["v_star_ci"] = interval(optimal_tokens_continuous(boot["alpha"], boot["beta"], Q, G))
            row["best_valid_v_ci"] = [int(v) for v in interval(optimal_tokens_valid(boot["alpha"], boot["beta"], Q, G))]
        rows.append(row)
    return rows


def budget_query(fit, budget, Q, G):
    N, V, error = (a[0] for a in best_config(fit, budget, Q, G))
    if not np.isfinite(error):
        smallest = inference_flops(N_RANGE[0], VALID_TOKENS[0], Q, G)
        raise BadInput(f"--budget {budget:g} FLOPs is below the cheapest configuration ({N_RANGE[0]:g}B LLM, "
                       f"1 visual token, Q = {Q}, G = {G}): {smallest:.3g} FLOPs")
    return {"budget": budget, "text_tokens": Q, "generated_tokens": G, "params_b": float(N), "tokens": int(V),
            "predicted_error": float(error), "flops_used": float(inference_flops(N, V, Q, G))}


def holdout_largest(cells, box):
    """Fit without the largest LLM, predict it: the paper's check (0.5B-7B predicting 14B within 2%,
    docs/sources.md)."""
    largest = cells.N.max()
    train, test = cells.subset(cells.N < largest), cells.subset(cells.N == largest)
    check_identifiable(train, f" without N = {largest:g}")
    fit = fit_law(train, box)
    predicted = law(fit, test.N, test.V)
    with np.errstate(divide="ignore", invalid="ignore"):  # a perfect score (error 0) has no relative error
        relative = np.abs(predicted - test.error) / test.error
    return {"held_out_params_b": float(largest), "fit": fit,
            "mean_relative_error": float(relative.mean()), "max_relative_error": float(relative.max()),
            "cells": [{"tokens": float(v), "observed_error": float(o), "predicted_error": float(e), "relative_error": float(r)}
                      for v, o, e, r in zip(test.V, test.error, predicted, relative)]}
