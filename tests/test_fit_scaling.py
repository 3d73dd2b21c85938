"""Tests for 04_fit_scaling.py and scaling_law.py: exactness of the fit, the paper's targets, recovery, bad input."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import lsq_linear, minimize

import scaling_law as sl

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "04_fit_scaling.py"
spec = importlib.util.spec_from_file_location("fit_scaling", SCRIPT)
fs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fs)

BOX = sl.PAPER_BOX


def paper_cells():
    cells, warnings = fs.load_cells(fs.PAPER_DATA["reasoning"], None, None)
    assert warnings == []
    return cells


def synthetic_cells(true, sizes, noise, seed):
    N = np.repeat(np.asarray(sizes, float), len(sl.VALID_TOKENS))
    V = np.tile(sl.VALID_TOKENS, len(sizes)).astype(float)
    error = sl.law(true, N, V) + np.random.default_rng(seed).normal(0, noise, N.size)
    return sl.Cells(N, V, error, "synthetic", [])


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("paper")
    result = fs.main(["--paper", "--bootstrap", "1000", "--holdout-largest", "--output-dir", str(out)])
    return result, out


# -----------------------------------------------------------------------------
# the paper's targets

def test_paper_published_values_shipped_with_source():
    text = fs.PAPER_DATA["reasoning"].read_text()
    assert "locuslab/llava-token-compression" in text and "2411.03312" in text
    cells = paper_cells()
    assert len(cells.N) == 28
    assert set(cells.N) == {0.5, 1.8, 4, 7} and set(cells.V) == set(sl.VALID_TOKENS.tolist())
    assert 1 - cells.error[(cells.N == 0.5) & (cells.V == 1)][0] == pytest.approx(0.3855)
    assert 1 - cells.error[(cells.N == 7) & (cells.V == 576)][0] == pytest.approx(0.5354)


def test_paper_ocr_values_fit_with_tokens_mattering_more(tmp_path):
    """Fig. 3b: on OCR the trend reverses, alpha < beta. The release's OCR values ship with its slips noted."""
    text = fs.PAPER_DATA["ocr"].read_text()
    assert "scaling_law_code/values.py" in text and "0.135895545" in text and "equals 4B at V=576" in text
    result = fs.main(["--paper", "ocr", "--bootstrap", "0", "--no-plots", "--output-dir", str(tmp_path)])
    assert result["n_cells"] == 28 and 1 - result["grid"]["D"] > 0
    assert result["alpha"] < result["beta"] and result["grid"]["alpha"] < result["grid"]["beta"]


def test_paper_targets(paper_run):
    result, out = paper_run
    assert 0.069 <= result["alpha"] <= 0.080
    assert 0.0145 <= result["beta"] <= 0.0175
    assert result["sse"] <= 3.96e-4
    assert result["D"] == 0 and any("D = 0 sits on the lower edge" in w for w in result["warnings"])
    # the full grid's optimum and the continuous fit inside its box (docs/fitting.md)
    grid = result["grid"]  # the release-comparable number, fit.json's "grid"
    assert grid["alpha"] == pytest.approx(0.0747, abs=1e-4) and grid["beta"] == pytest.approx(0.0162, abs=1e-4)
    assert grid["A"] == pytest.approx(0.557, abs=1e-3) and grid["D"] == pytest.approx(0.0333, abs=1e-4)
    assert grid["sse"] == pytest.approx(3.963e-4, rel=1e-3)
    assert result["alpha"] == pytest.approx(0.0709, abs=1e-4) and result["beta"] == pytest.approx(0.0151, abs=1e-4)
    assert result["A"] == pytest.approx(0.591, abs=1e-3) and result["sse"] == pytest.approx(3.794e-4, rel=1e-3)

    saved = json.loads((out / "fit.json").read_text())
    for key in ("A", "alpha", "beta", "D", "sse", "r2", "alpha_ci", "beta_ci", "ratio_ci", "optimal_v"):
        assert key in saved
    assert saved["grid"]["alpha"] == pytest.approx(0.0747, abs=1e-4) and {"A", "beta", "D", "sse"} <= set(saved["grid"])
    for name in ("alpha", "beta", "ratio"):
        lo, hi = saved[f"{name}_ci"]
        assert lo <= saved[name] <= hi
    for path in ("scaling_q0", "scaling_q50", "optimal_tokens"):
        assert (out / f"{path}.png").stat().st_size > 10_000 and (out / f"{path}.pdf").exists()


def test_paper_optimal_tokens(paper_run):
    result, _ = paper_run
    fit = result
    # Q = 0: one visual token at every budget the 0.5B-20B range can spend
    budgets = np.geomspace(sl.inference_flops(0.5, 1, 0, 0), sl.inference_flops(20, 1, 0, 0), 300)
    N, V, error = sl.best_config(fit, budgets, 0, 0)
    assert np.all(V == 1) and np.all(np.isfinite(error))
    assert np.all(np.diff(N) > 0)  # the budget goes to the LLM
    table = {row["text_tokens"]: row for row in result["optimal_v"]}
    assert table[0]["best_valid_v"] == 1 and table[0]["best_valid_v_ci"] == [1, 1]
    # Q = 50: the paper's "about 14-16" tokens; 16 of the valid set
    assert 12 <= table[50]["v_star"] <= 16 and table[50]["best_valid_v"] == 16
    assert table[50]["v_star_ci"][0] <= table[50]["v_star"] <= table[50]["v_star_ci"][1]
    assert [table[q]["v_star"] for q in sl.TEXT_LENGTHS] == sorted(table[q]["v_star"] for q in sl.TEXT_LENGTHS)


def test_paper_holdout_within_two_percent(paper_run):
    holdout = paper_run[0]["holdout"]
    assert holdout["held_out_params_b"] == 7 and len(holdout["cells"]) == 7
    assert holdout["max_relative_error"] < 0.02


# -----------------------------------------------------------------------------
# the fit is exact

def test_full_grid_optimum_equals_brute_force():
    """Every one of the 5,000,000 grid points, residual by residual, without the quadratic shortcut."""
    cells = paper_cells()
    A, alphas, betas, D = (np.linspace(*BOX[name]) for name in sl.PARAMS)
    best = (np.inf, None)
    for alpha in alphas:
        x = cells.N[None, :] ** -alpha * cells.V[None, :] ** -betas[:, None]  # (beta, point)
        pred = A[None, :, None, None] * x[:, None, None, :] + D[None, None, :, None]
        sse = ((pred - cells.error) ** 2).sum(-1)
        i = np.unravel_index(sse.argmin(), sse.shape)
        if sse[i] < best[0]:
            best = (sse[i], (A[i[1]], alpha, betas[i[0]], D[i[2]]))
    grid = sl.fit_full_grid(cells, BOX)
    assert (grid["A"], grid["alpha"], grid["beta"], grid["D"]) == best[1]
    assert grid["sse"] == pytest.approx(best[0], rel=1e-12)


def test_closed_form_matches_bounded_least_squares():
    rng = np.random.default_rng(0)
    box = {"A": (0.2, 0.7, 50), "D": (0.0, 0.3, 10)}
    for _ in range(200):
        x, y, w = rng.uniform(0.3, 1.5, 12), rng.uniform(-0.2, 1.2, 12), rng.integers(0, 4, 12).astype(float)
        w[:2] = 1
        # the basis N^-alpha V^-beta is x itself with alpha = 1, beta = 0, log N = -log x
        m = sl.moments(np.ones(1), np.zeros(1), -np.log(x), np.zeros_like(x), w[:, None], y)
        A, D, sse = (v[0, 0] for v in sl.solve_amplitude_and_floor(m, box))
        sqrt_w = np.sqrt(w)
        ref = lsq_linear(np.stack([x, np.ones_like(x)], 1) * sqrt_w[:, None], y * sqrt_w,
                         bounds=([0.2, 0.0], [0.7, 0.3]), tol=1e-14)
        assert sse == pytest.approx(2 * ref.cost, rel=1e-8, abs=1e-12)
        assert (A, D) == pytest.approx(tuple(ref.x), abs=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_refined_fit_is_the_box_optimum(seed):
    """No multi-start of a bounded quasi-Newton method on the 4-D problem finds a lower SSE."""
    rng = np.random.default_rng(seed)
    cells = paper_cells() if seed == 0 else synthetic_cells(
        {"A": rng.uniform(0.2, 0.8), "alpha": rng.uniform(0, 0.25), "beta": rng.uniform(0, 0.06),
         "D": rng.uniform(-0.05, 0.35)}, [0.5, 1.8, 4, 7], rng.choice([0.001, 0.01]), seed)
    fit = sl.fit_law(cells, BOX)
    bounds = [BOX[name][:2] for name in sl.PARAMS]
    sse = lambda q: float(((q[0] * cells.N ** -q[1] * cells.V ** -q[2] + q[3] - cells.error) ** 2).sum())
    starts = [[rng.uniform(*b) for b in bounds] for _ in range(8)]
    best = min(minimize(sse, s, bounds=bounds, method="L-BFGS-B", options={"ftol": 1e-16, "gtol": 1e-14}).fun
               for s in starts)
    assert fit["sse"] <= best * (1 + 1e-9)
    assert fit["sse"] <= sl.fit_full_grid(cells, BOX)["sse"]
    for name in sl.PARAMS:
        assert BOX[name][0] <= fit[name] <= BOX[name][1]


def test_bootstrap_fits_are_the_box_optimum_of_their_weighted_sse():
    """A resample is the cells weighted by how often it drew them: each of its fits is that weighted SSE's optimum."""
    cells, rng = paper_cells(), np.random.default_rng(0)
    W = sl.bootstrap_weights(cells, 4, seed=0)
    fits = sl.fit_continuous(cells, BOX, W)
    bounds = [BOX[name][:2] for name in sl.PARAMS]
    for column, w in enumerate(W.T):
        sse = lambda q: float((w * (q[0] * cells.N ** -q[1] * cells.V ** -q[2] + q[3] - cells.error) ** 2).sum())
        best = min(minimize(sse, [rng.uniform(*b) for b in bounds], bounds=bounds, method="L-BFGS-B",
                            options={"ftol": 1e-16, "gtol": 1e-14}).fun for _ in range(8))
        assert sse([fits[name][column] for name in sl.PARAMS]) <= best * (1 + 1e-9)


# -----------------------------------------------------------------------------
# recovery of known parameters

def test_recovers_exact_parameters_without_noise():
    true = {"A": 0.45, "alpha": 0.12, "beta": 0.03, "D": 0.1}
    fit = sl.fit_law(synthetic_cells(true, [0.5, 1, 2, 4, 8, 16], 0.0, 0), BOX)
    assert fit["sse"] < 1e-13  # the expanded quadratic SSE is exact to ~1e-15
    for name in sl.PARAMS:
        assert fit[name] == pytest.approx(true[name], abs=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_known_parameters_within_bootstrap_interval(seed):
    true = {"A": 0.45, "alpha": 0.12, "beta": 0.03, "D": 0.1}
    cells = synthetic_cells(true, [0.5, 1, 2, 4, 8, 16], 0.002, seed)
    fit = sl.fit_law(cells, BOX)
    boot = sl.bootstrap(cells, BOX, 300, seed=0)
    for name in sl.PARAMS:
        lo, hi = sl.interval(boot[name])
        assert lo <= true[name] <= hi, name
        assert lo <= fit[name] <= hi, name
    assert abs(fit["alpha"] - true["alpha"]) < 0.02 and abs(fit["beta"] - true["beta"]) < 0.005


# -----------------------------------------------------------------------------
# input: JSONL from 03_evaluate.py, benchmark averaging, suites, the CLI options

def write_results(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def evaluate_rows(true, benchmarks, compressor="tokenpacker", drop=()):
    rows = []
    for N in (0.5, 1.8, 4, 7):
        for V in sl.VALID_TOKENS.tolist():
            for k, benchmark in enumerate(benchmarks):
                if (N, V, benchmark) in drop:
                    continue
                accuracy = 1 - sl.law(true, N, V) + 0.02 * (k - (len(benchmarks) - 1) / 2)
                rows.append({"llm": f"qwen1.5-{N}b", "params_b": N, "tokens": V, "compressor": compressor,
                             "benchmark": benchmark, "metric": "accuracy", "score": 100 * accuracy,
                             "normalized": accuracy})
    return rows


TRUE = {"A": 0.5, "alpha": 0.08, "beta": 0.02, "D": 0.05}


def test_results_jsonl_is_averaged_over_benchmarks(tmp_path):
    path = write_results(tmp_path / "results.jsonl", evaluate_rows(TRUE, ["gqa", "pope", "mme"]))
    cells, warnings = fs.load_cells(path, None, None)
    assert warnings == [] and cells.benchmarks == ["gqa", "mme", "pope"] and len(cells.N) == 28
    # the benchmark offsets cancel in the average: the law's own values come back
    assert cells.error == pytest.approx(sl.law(TRUE, cells.N, cells.V), abs=1e-12)
    only_gqa, _ = fs.load_cells(path, "GQA", None)
    assert only_gqa.benchmarks == ["gqa"]
    assert only_gqa.error == pytest.approx(sl.law(TRUE, cells.N, cells.V) + 0.02, abs=1e-12)


def test_uneven_benchmark_sets_warn(tmp_path, capsys):
    rows = evaluate_rows(TRUE, ["gqa", "pope"], drop={(0.5, 1, "pope"), (7, 576, "pope")})
    path = write_results(tmp_path / "results.jsonl", rows)
    result = fs.main(["--scores", str(path), "--bootstrap", "0", "--no-plots", "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "different benchmark sets" in err and "N=0.5 V=1 lacks pope" in err
    assert any("different benchmark sets" in w for w in result["warnings"])


def test_several_compressors_need_a_choice(tmp_path):
    rows = evaluate_rows(TRUE, ["gqa"]) + evaluate_rows(TRUE, ["gqa"], compressor="quecc")
    path = write_results(tmp_path / "results.jsonl", rows)
    with pytest.raises(fs.BadInput, match="several compressors .*--compressor"):
        fs.load_cells(path, None, None)
    cells, _ = fs.load_cells(path, None, "quecc")
    assert len(cells.N) == 28


def test_budget_query_and_generated_tokens(tmp_path, capsys):
    result = fs.main(["--paper", "--bootstrap", "0", "--no-plots", "--budget", "1e10", "--text-tokens", "0",
                      "--output-dir", str(tmp_path)])
    assert result["budget"]["tokens"] == 1 and result["budget"]["params_b"] == pytest.approx(5.0)
    assert "N = 5B, V = 1" in capsys.readouterr().out
    result = fs.main(["--paper", "--bootstrap", "0", "--no-plots", "--generated-tokens", "50", "--output-dir", str(tmp_path)])
    assert {row["text_tokens"]: row["best_valid_v"] for row in result["optimal_v"]}[0] == 16


def test_range_moves_the_box_and_edges_are_reported(tmp_path):
    result = fs.main(["--paper", "--bootstrap", "0", "--no-plots", "--range", "alpha=0:0.05", "--output-dir", str(tmp_path)])
    assert result["alpha"] == pytest.approx(0.05)
    assert any("alpha = 0.05 sits on the upper edge" in w and "--range alpha" in w for w in result["warnings"])
    assert result["on_edge"]["alpha"] == "upper" and "beta" not in result["on_edge"]


# -----------------------------------------------------------------------------
# bad input: a clear one-line error naming the file (and line), exit status 2

HEADER = "params_b,tokens,score\n"
GOOD = "".join(f"{n},{v},0.5\n" for n in (0.5, 7) for v in (1, 576))


@pytest.mark.parametrize("name, content, expected", [
    ("few_cells.csv", HEADER + "0.5,1,0.4\n0.5,4,0.4\n7,1,0.5\n", "only 3 distinct (N, V) cells, fewer than the law's 4 parameters"),
    ("one_size.csv", HEADER + "".join(f"7,{v},0.5\n" for v in (1, 4, 16, 36)), "needs at least two LLM sizes"),
    ("one_count.csv", HEADER + "".join(f"{n},16,0.5\n" for n in (0.5, 1.8, 4, 7)), "needs at least two token counts"),
    ("flat.csv", HEADER + GOOD, "every cell has error 0.5; the law needs errors that vary"),
    ("nan.csv", HEADER + GOOD + "4,16,nan\n", "line 6: score = 'nan' is not finite"),
    ("inf.jsonl", '{"params_b": 4, "tokens": 16, "score": Infinity}\n', "line 1: score = inf is not finite"),
    ("text.csv", HEADER + "4,16,high\n" + GOOD, "line 2: score = 'high' is not a number"),
    ("above_one.csv", HEADER + GOOD + "4,16,57.3\n", "line 6: score = 57.3 is outside [0, 1]"),
    ("negative.csv", HEADER + GOOD + "4,-16,0.5\n", "line 6: tokens = -16 must be positive"),
    ("zero_tokens.csv", HEADER + "4,0,0.5\n" + GOOD, "line 2: tokens = 0 must be positive"),
    ("zero_size.csv", HEADER + "0,16,0.5\n" + GOOD, "line 2: params_b = 0 must be positive"),
    ("no_tokens.csv", "params_b,score\n0.5,0.4\n", "line 2: missing column(s) tokens"),
    ("no_score.jsonl", '{"params_b": 4, "tokens": 16}\n', "line 1: missing column(s) score"),
    ("no_benchmark.jsonl", '{"params_b": 4, "tokens": 16, "normalized": 0.5}\n', "line 1: missing column(s) benchmark"),
    ("ragged.csv", HEADER + GOOD + "4,16\n", "line 6: 2 fields, but the header (line 1) has 3"),
    ("broken.jsonl", '{"params_b": 4, "tokens": 16, "score": 0.5}\n{"params_b": 4,\n', "line 2: not valid JSON"),
    ("list.jsonl", '[4, 16, 0.5]\n', "line 1: expected a JSON object"),
    ("empty.csv", "# nothing here\n\n", "no data rows"),
    ("header_only.csv", HEADER, "a header but no data rows"),
])
def test_bad_input_is_refused(tmp_path, capsys, name, content, expected):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(SystemExit) as exit:
        fs.main(["--scores", str(path), "--no-plots", "--output-dir", str(tmp_path / "out")])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("04_fit_scaling.py: error: ") and str(path) in err and expected in err, err
    assert not (tmp_path / "out" / "fit.json").exists()


@pytest.mark.parametrize("make, expected", [
    (lambda p: p, "cannot read the file (No such file or directory)"),
    (lambda p: (p.mkdir(), p)[1], "cannot read the file (Is a directory)"),
    (lambda p: (p.write_bytes(b"\xff\xfe\x00params"), p)[1], "cannot read the file ("),
])
def test_unreadable_file_is_refused(tmp_path, capsys, make, expected):
    path = make(tmp_path / "scores.csv")
    with pytest.raises(SystemExit):
        fs.main(["--scores", str(path), "--no-plots", "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert str(path) in err and expected in err


def test_bad_options_are_refused(tmp_path, capsys):
    path = write_results(tmp_path / "results.jsonl", evaluate_rows(TRUE, ["gqa"]))
    for args, expected in [(["--suite", "docvqa"], "no rows for benchmark(s) docvqa (the file has: gqa)"),
                           (["--compressor", "prumerge"], "no rows with compressor 'prumerge'"),
                           (["--budget", "1e8"], "is below the cheapest configuration")]:
        with pytest.raises(SystemExit):
            fs.main(["--scores", str(path), "--bootstrap", "0", "--no-plots", "--output-dir", str(tmp_path), *args])
        assert expected in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit):
        fs.main(["--paper", "--output-dir", str(tmp_path / "a_file" / "out")])
    assert "cannot create the output directory (Not a directory)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        fs.main(["--paper", "--range", "D=-0.1:0.3"])
    assert "0 <= LO < HI" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        fs.main(["--paper", "--suite", "gqa", "--output-dir", str(tmp_path)])
    assert "line 14: --suite needs a benchmark column" in capsys.readouterr().err


def test_command_line_never_shows_a_traceback(tmp_path):
    bad = tmp_path / "scores.csv"
    bad.write_text(HEADER + GOOD + "4,16,-0.2\n")
    run = subprocess.run([sys.executable, str(SCRIPT), "--scores", str(bad), "--no-plots"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    assert all(part in run.stderr for part in (f"{bad}, line 6", "score = -0.2", "outside [0, 1]"))
