"""The paper in a box: the toy-world scaling study on a CPU, nothing downloaded.

    python -m toy.demo                 # the default grid: 3 LLM sizes x V in 1, 4, 16, 64, 2 seeds, then the fit
    python -m toy.demo --full          # 5 sizes x V in 1, 4, 16, 36, 64, 144, 576, 3 seeds
    python -m toy.demo --sizes toy-s --tokens 4          # one model
    python -m toy.demo --compressors quecc,tokenpacker,pool,pixelshuffle,resampler   # the grid for each
    python -m toy.demo --print-real    # the launch lines of the paper's real grid

The toy LLMs and the vision tower are pretrained (toy/pretrain.py: shipped in toy/pretrained/, a
--full size made once on first use into cache/pretrained/). Each LLM's text ceiling, its accuracy on
the held-out reasoning questions with the scene in words, goes beside the grid. Then for every
compressor, (LLM size, V) and training seed: stage 1 (01_pretrain_projector.py), stage 2
(02_finetune.py, scoring reasoning questions as it trains), evaluation on the held-out reasoning and
OCR questions (03_evaluate.py); then the
law fitted per compressor and split (04_fit_scaling.py) on the cell means, its bootstrap redrawing
the seeds of each cell. A V a compressor cannot make (pixel shuffle below V = 9) is skipped and named.
The summary states an ordering (LLM size vs visual tokens) only where it stands above the
seed-to-seed spread. Every step is a repo script run as a user would run it (in a process forked
from one that imported the libraries once), and is skipped when its output exists, so a killed
demo picks up where it stopped (and a kill ends the script it is running too). The frozen vision
tower's features are computed once per image (--feature-cache) and reused by every run, epoch and
evaluation.

Outputs in --out: text_ceiling.json, scores.csv (compressor, params_b, tokens, seed, benchmark, score per run),
fit_COMPRESSOR_reasoning.json and fit_COMPRESSOR_ocr.json with the plots in fit_COMPRESSOR_reasoning/
and fit_COMPRESSOR_ocr/, summary.md (with learning_curves.png and, with several compressors,
accuracy_vs_tokens.png beside it),
timings.json (seconds per run, summed over resumes; "total" is this invocation's wall time),
demo.log (every script's output), and data/, cache/, runs/.
"""
import argparse
import csv
import hashlib
import json
import multiprocessing
import os
import runpy
import shutil
import signal
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import torch
from tqdm import tqdm

import compressors
import guard
import toy
import vlm
from toy import make_data, pretrain, summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: scripts run from there
# Two seeds of 12 cells, 24 runs: the smallest grid that spans 20x in LLM size (the shipped pretrained
# sizes) and 64x in V with a seed spread to read (docs/toy_world.md has its time).
DEFAULT_GRID = ("toy-xxs,toy-xs,toy-s", "1,4,16,64")
FULL_GRID = ("toy-xxs,toy-xs,toy-s,toy-m,toy-l", "1,4,16,36,64,144,576")
# Batch sizes of the toy runs, and stage 2's learning rate at width 64 (stage2_lr scales it).
STAGE1_BATCH, STAGE2_BATCH, STAGE2_LR = 32, 16, 3e-4
# Steps: stage 1 sees 0.83 captions per stage-2 conversation (1,600 : 1,920), LLaVA-1.5's proportion
# (558K captions : 665K conversations); the 20-minute demo sets the total (docs/toy_world.md).
STAGE1_STEPS, STAGE2_STEPS = 50, 120
# Stage 2 scores the first CURVE_QUESTIONS held-out reasoning questions CURVE_POINTS times as it trains.
CURVE_POINTS, CURVE_QUESTIONS = 5, 70
# Every training image asks as many of its question types as can share one conversation without
# giving an answer away (about four), then for its caption: several answers for one encoding and one sequence
QUESTIONS_PER_IMAGE = 6

# The paper's scaling grid (section 3.2): Qwen1.5 chat LLMs x V, LLaVA-1.5 data, both suites, TokenPacker
# compression, stage-2 batch doubled to 256; the fit on the nominal sizes (the release's values.py).
REAL_LLMS = {"Qwen/Qwen1.5-0.5B-Chat": 0.5, "Qwen/Qwen1.5-1.8B-Chat": 1.8, "Qwen/Qwen1.5-4B-Chat": 4,
             "Qwen/Qwen1.5-7B-Chat": 7}
REAL_TOKENS = [1, 4, 16, 36, 64, 144, 576]
REAL_REASONING = "mme,gqa,ai2d,mmbench,mmmu,scienceqa,mathvista,pope,chartqa"
REAL_OCR = "docvqa,textvqa"
REAL_GRID = 24  # CLIP ViT-L/14 at 336 px: 24 x 24 patches


def print_real(compressor):
    """The real grid as shell lines: 4 LLMs x the 7 token counts (those the compressor makes), both
    stages, evaluation, fit. Data, stage 1's output and evaluation data are the scripts' defaults
    (docs/data.md), so the lines run as printed."""
    tokens = [v for v in REAL_TOKENS if v in compressors.valid_tokens(compressor, REAL_GRID)]
    print(f"# The paper's scaling grid (section 3.2) on one 8-GPU node: {4 * len(tokens)} VLMs, then one fit per suite.")
    if len(tokens) < len(REAL_TOKENS):
        print(f"# {compressor} cannot make V = {', '.join(str(v) for v in REAL_TOKENS if v not in tokens)} on "
              f"CLIP-L/336's {REAL_GRID}x{REAL_GRID} patches: those cells are left out.")
    print(f"# --compressor {compressor} (the paper's: tokenpacker, at 576 one query per patch), stage-2 global batch 256, "
          "HF Trainer's loss")
    print("# normalisation, which averages over micro-batches: so the per-GPU micro-batch is LLaVA-1.5's (32 in")
    print("# stage 1, 16 in stage 2, on 8 GPUs). results.jsonl carries the nominal LLM size the fit uses (--params-b).")
    print("# Data: LLaVA-1.5's, laid out under data/ as docs/data.md shows; benchmarks converted with")
    print("# data_prep/convert_benchmarks.py into data/eval/.")
    recipe = f"--compressor {compressor} --loss-norm llava --save-every 500 --resume"
    for llm, params_b in REAL_LLMS.items():
        for v in tokens:
            print(f"accelerate launch 01_pretrain_projector.py --llm {llm} --tokens {v} {recipe} --micro-batch-size 32")
            print(f"accelerate launch 02_finetune.py --llm {llm} --tokens {v} {recipe} --batch-size 256 "
                  "--micro-batch-size 16 --grad-checkpointing --group-by-length")
            print(f"accelerate launch 03_evaluate.py --model runs/{llm.split('/')[-1]}-{compressor}-v{v}/stage2 "
                  f"--params-b {params_b:g} --bench {REAL_REASONING},{REAL_OCR}")
    print(f"cat runs/*-{compressor}-v*/stage2/eval/results.jsonl > runs/{compressor}_results.jsonl")
    for split, suite in (("reasoning", REAL_REASONING), ("ocr", REAL_OCR)):
        print(f"python 04_fit_scaling.py --scores runs/{compressor}_results.jsonl --suite {suite} "
              f"--output-dir runs/fit_{compressor}_{split}")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--sizes", help=f"toy LLM presets, comma-separated (default {DEFAULT_GRID[0]})")
    p.add_argument("--tokens", help=f"visual token counts, comma-separated (default {DEFAULT_GRID[1]})")
    p.add_argument("--full", action="store_true", help=f"sizes {FULL_GRID[0]}, tokens {FULL_GRID[1]}")
    p.add_argument("--print-real", action="store_true", help="print the real-scale grid's commands and exit")
    p.add_argument("--compressors", "--compressor", dest="compressors", metavar="NAMES",
                   help="comma-separated, each trained on the whole grid and fitted apart: "
                        f"{', '.join(compressors.COMPRESSORS)} (default quecc; with --print-real tokenpacker, the paper's)")
    p.add_argument("--vision", default="toy", help="toy, or a directory of a CLIP vision model")
    p.add_argument("--stage1-steps", type=int, default=STAGE1_STEPS)
    p.add_argument("--stage2-steps", type=int, default=STAGE2_STEPS)
    p.add_argument("--num-train", type=int, default=2000, help="training images")
    p.add_argument("--num-eval", type=int, default=100, help="held-out images (4-6 questions each)")
    p.add_argument("--seeds", type=int, help="training seeds per (LLM size, V), 1..K (default 2, with --full 3): "
                   "the spread between them is the noise any conclusion must stand above")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="runs trained side by side, one CPU thread each (tiny models use threads poorly)")
    args = p.parse_args()
    if args.full and (args.sizes or args.tokens):
        p.error("--full sets --sizes and --tokens; give one or the other")
    sizes, tokens = FULL_GRID if args.full else DEFAULT_GRID
    args.seeds = args.seeds or (3 if args.full else 2)
    if args.seeds < 1:
        p.error(f"--seeds must be at least 1, got {args.seeds}")
    args.sizes = (args.sizes or sizes).split(",")
    args.tokens = [int(t) for t in (args.tokens or tokens).split(",")]
    args.compressors = list(dict.fromkeys((args.compressors or ("tokenpacker" if args.print_real else "quecc")).split(",")))
    unknown = [name for name in args.compressors if name not in compressors.COMPRESSORS]
    if unknown:
        p.error(f"unknown compressor {unknown[0]!r}; choose from {', '.join(compressors.COMPRESSORS)}")
    return args


# The settings that decide what every run in --out learns (the grid, compressors included, only decides
# which runs: a run's directory names its compressor): flags, and those set in this file, named here as
# the refusal names them.
RUN_SETTINGS = ("vision", "stage1_steps", "stage2_steps", "num_train", "num_eval", "seeds")
CODE_SETTINGS = {"stage1_batch": "stage-1 batch size", "stage2_batch": "stage-2 batch size",
                 "stage2_lr": "stage-2 learning rates", "pretrained": "pretrained toy models",
                 "data": "toy data generator"}


def stage2_lr(size):
    """STAGE2_LR x 64/width: an Adam step moves a hidden layer's output in proportion to width x lr,
    so a pretrained LLM keeps what it knows at one rate per width (docs/toy_world.md has the measurements)."""
    return STAGE2_LR * 64 / toy.LLM_SIZES[size][0]


def check_settings(out, args):
    """A rerun into the same --out must not reuse models trained with other settings."""
    path = os.path.join(out, "settings.json")
    settings = {name: getattr(args, name) for name in RUN_SETTINGS}
    settings.update(stage1_batch=STAGE1_BATCH, stage2_batch=STAGE2_BATCH,
                    stage2_lr={size: stage2_lr(size) for size in sorted(toy.LLM_SIZES)},
                    pretrained={name: fingerprint(pretrain.settings(name)) for name in (*toy.PRETRAINED_LLMS, toy.VISION)},
                    # the data in --out is made once: a changed generator would leave the old world under the new code
                    data=make_data.fingerprint(questions_per_image=QUESTIONS_PER_IMAGE))
    if os.path.exists(path):
        saved = json.load(open(path))
        if "compressor" in saved:  # one compressor per --out, its runs named without it
            sys.exit(f"error: {out} holds runs of an earlier demo, named without their compressor "
                     f"({saved['compressor']}); use another --out, or delete it")
        changed = guard.changed_settings(saved, settings, CODE_SETTINGS)
        if changed:
            sys.exit(f"error: {out} holds runs made with {', '.join(changed)}; use another --out, or delete it")
    with open(path, "w") as f:
        json.dump(settings, f, indent=2)


def fingerprint(settings):
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def pretrain_missing(log, args):
    """Pretrain, once, the toy models of the grid that neither ship nor are cached (--full's sizes)."""
    wanted = [toy.canonical(size) for size in args.sizes] + [toy.VISION] * (args.vision == "toy")
    missing = [name for name in dict.fromkeys(wanted) if toy.pretrained_dir(name) is None]
    if missing:
        print(f"pretraining {', '.join(missing)} once, into {toy.CACHED} (toy/pretrain.py)")
        run(log, "-m", "toy.pretrain", "--models", ",".join(missing), "--root", toy.CACHED)


def text_ceilings(out, data, sizes):
    """{size: its text ceiling}: each pretrained LLM on the held-out reasoning questions, the scene in
    words where the VLM sees the image (make_data's scenes.jsonl); kept in text_ceiling.json."""
    path = os.path.join(out, "text_ceiling.json")
    ceilings = json.load(open(path)) if os.path.exists(path) else {}
    rows = [json.loads(line) for line in open(os.path.join(data, "eval", summary.SPLITS["reasoning"], "scenes.jsonl"))]
    for size in sizes:
        if size not in ceilings:
            llm, tokenizer = toy.load_llm(size)
            ceilings[size] = pretrain.text_ceiling(llm, tokenizer, rows)
    with open(path, "w") as f:
        json.dump(ceilings, f, indent=2)
    return {size: ceilings[size] for size in sizes}


class StepFailed(Exception):
    pass


# Each script runs in a fork of one process that imported the libraries once (multiprocessing's
# forkserver, a clean single-threaded process): a script then starts in about a second instead of
# the eight that importing torch and transformers takes, and the default grid runs 72 of them.
SCRIPTS = multiprocessing.get_context("forkserver")
SCRIPTS.set_forkserver_preload(["train", "evaluation", "scaling_law"])  # what the scripts import

# The scripts running now. A demo that is killed ends them first (end_with_the_demo): killing a
# process does not kill its children, and a stage 2 left training on would hold the CPUs and its
# output directory's lock for the rest of its steps.
children, children_lock = set(), threading.RLock()


def run_script(args, stdout, stderr, cwd=ROOT, threads=None, environ=None):
    """In a process forked from SCRIPTS' server: `python ARGS` run in `cwd`, its output appended to the
    files `stdout` and `stderr` (one file may take both), in `environ` (default: the server's)."""
    for path, stream in ((stdout, sys.stdout), (stderr, sys.stderr)):
        with open(path, "a") as f:
            os.dup2(f.fileno(), stream.fileno())
    sys.stdout.reconfigure(line_buffering=True)  # the log shows each line as it is printed
    os.chdir(cwd)
    if environ is not None:
        os.environ.clear()
        os.environ.update(environ)
    multiprocessing.set_start_method(None, force=True)  # its data loaders start processes as from a shell
    if threads:
        torch.set_num_threads(threads)  # what OMP_NUM_THREADS would set, read when torch was imported
    if args[0] == "-m":
        sys.argv = [args[1], *args[2:]]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(args)
        runpy.run_path(os.path.join(ROOT, args[0]), run_name="__main__")


def run(log, *args, threads=None):
    """A repo script as `python ARGS` would run it, in a process of its own, its output appended to `log`."""
    with open(log, "a") as f:
        f.write(f"\n$ python {' '.join(args)}\n")
    with children_lock:  # not started while a signal handler ends the others
        child = SCRIPTS.Process(target=run_script, args=(args, log, log), kwargs=dict(threads=threads))
        child.start()
        children.add(child)
    try:
        child.join()
    finally:
        with children_lock:
            children.discard(child)
    if child.exitcode:
        raise StepFailed(f"{args[1] if args[0] == '-m' else args[0]} failed; its output is at the end of {log}")


def end_with_the_demo(signum, frame):
    """SIGTERM, SIGINT (Ctrl-C) or SIGHUP: end the running scripts, then the demo, as the signal
    would have. (SIGKILL cannot be caught: the scripts then run on, and `kill -- -PID` ends the
    process group of a demo started from an interactive shell.)"""
    with children_lock:  # held to the end: no script starts or leaves the set meanwhile
        for child in children:
            child.terminate()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def run_dirs(out, compressor, size, tokens, seed):
    """-> (name, stage-1, stage-2 and evaluation directories) of one grid point's run with one seed."""
    name = f"{compressor}-{size}-v{tokens}-s{seed}"
    return (name, *(os.path.join(out, "runs", name, part) for part in ("stage1", "stage2", "eval")))


def train_and_evaluate(args, compressor, size, tokens, seed, out, bar, stage1_only=False):
    """Stage 1, stage 2 and evaluation of one grid point with one seed; each step skipped if already done.
    -> seconds its steps took, counted across invocations (kept in the run's seconds.json), so a
    resumed demo still reports what every run cost."""
    data = os.path.join(out, "data")
    name, stage1, stage2, evaluation = run_dirs(out, compressor, size, tokens, seed)
    log = os.path.join(out, "runs", name, "log.txt")
    seconds_file = os.path.join(out, "runs", name, "seconds.json")
    os.makedirs(os.path.dirname(log), exist_ok=True)
    seconds = json.load(open(seconds_file)) if os.path.exists(seconds_file) else {}
    common = ["--vision", args.vision, "--image-folder", os.path.join(data, "images"),
              "--feature-cache", os.path.join(out, "cache"), "--compressor", compressor, "--num-workers", "0", "--seed", str(seed)]
    threads = 1 if args.jobs > 1 else None

    redo = False  # once a step runs, the steps after it, which read its output, run again too

    def step(done_when, *script_args, threads):
        nonlocal redo
        if redo or not os.path.exists(done_when):  # what an interrupted earlier attempt left is redone
            redo = True
            t0 = time.time()
            run(log, *script_args, "--overwrite", threads=threads)
            seconds[script_args[0]] = round(time.time() - t0, 1)
            with open(seconds_file, "w") as f:
                json.dump(seconds, f, indent=2)

    step(os.path.join(stage1, vlm.CONFIG_FILE),  # written last: the output is complete
         "01_pretrain_projector.py", "--llm", size, "--tokens", str(tokens), *common,
         "--data", os.path.join(data, "pretrain.json"), "--output-dir", stage1,
         "--max-steps", str(args.stage1_steps),
         "--batch-size", str(STAGE1_BATCH), "--micro-batch-size", str(STAGE1_BATCH),
         threads=None if stage1_only else threads)
    if stage1_only:
        return
    bar.update()
    step(os.path.join(stage2, vlm.CONFIG_FILE),
         "02_finetune.py", "--llm", size, "--tokens", str(tokens), *common, "--projector", stage1,
         "--data", os.path.join(data, "finetune.json"), "--output-dir", stage2,
         "--max-steps", str(args.stage2_steps),
         "--batch-size", str(STAGE2_BATCH), "--micro-batch-size", str(STAGE2_BATCH),
         "--lr", str(stage2_lr(size)),
         # the learning curves (learning_curves): reasoning questions scored as the run trains
         "--eval-every", str(max(1, args.stage2_steps // CURVE_POINTS)), "--eval-bench", summary.SPLITS["reasoning"],
         "--eval-limit", str(CURVE_QUESTIONS), "--eval-data-root", os.path.join(data, "eval"),
         "--eval-max-new-tokens", "4", threads=threads)
    bar.update()
    step(os.path.join(evaluation, "results.jsonl"),
         "03_evaluate.py", "--model", stage2, "--bench", ",".join(summary.SPLITS.values()),
         "--max-new-tokens", "4", "--data-root", os.path.join(data, "eval"), "--output-dir", evaluation,
         "--batch-size", "100", "--feature-cache", os.path.join(out, "cache"), threads=threads)
    bar.update()
    return round(sum(seconds.values()), 1)


def read_run(out, compressor, size, tokens, seed):
    """The score rows of one finished run."""
    _, _, stage2, evaluation = run_dirs(out, compressor, size, tokens, seed)
    losses = [json.loads(line)["loss"] for line in open(os.path.join(stage2, "log.jsonl"))]
    window = max(1, min(10, len(losses) // 2))  # the first and last ten steps; in a short run, halves that do not overlap
    rows = []
    for result in map(json.loads, open(os.path.join(evaluation, "results.jsonl"))):
        metrics = json.load(open(os.path.join(evaluation, result["benchmark"], "metrics.json")))
        rows.append(dict(run=f"{compressor}-{size}-v{tokens}", compressor=compressor, size=size, seed=seed,
                         params_b=result["params_b"], tokens=tokens,
                         benchmark=result["benchmark"],
                         score=result["normalized"], per_category=metrics.get("per_category", {}),
                         loss_first=summary.mean(losses[:window]), loss_last=summary.mean(losses[-window:])))
    return rows


def read_curves(out, grid):
    """{cell: {(reasoning question type, step): the seeds' accuracies}}: what stage 2 scored as it
    trained (02_finetune.py --eval-every, in its log.jsonl)."""
    curves = defaultdict(lambda: defaultdict(list))
    for compressor, size, tokens, seed in grid:
        stage2 = run_dirs(out, compressor, size, tokens, seed)[2]
        for entry in map(json.loads, open(os.path.join(stage2, "log.jsonl"))):
            scored = entry.get("eval", {}).get(summary.SPLITS["reasoning"], {})
            for category, accuracy in scored.get("per_category", {}).items():
                curves[f"{compressor}-{size}-v{tokens}"][category, entry["step"]].append(accuracy)
    return curves


def write_summary(out, rows, fits, baselines, noisy, args, seconds, skipped, curves=(), ceilings=None, counts=None):
    """summary.md: the accuracy table, the text ceilings, the fits per compressor, when each question
    type was learned (curves: learning_curves' lines) and what they say about the paper's findings.
    skipped: {compressor: the V of the grid it cannot make}; ceilings: text_ceilings' {size: ceiling},
    with counts: {split: questions per type} (question_counts), to score them over the kept types."""
    categories = sorted(baselines["reasoning"])
    seeds = sorted({r["seed"] for r in rows})
    several = len(args.compressors) > 1
    lines = ["# Toy-world scaling study", "",
             f"Grid: LLMs {', '.join(args.sizes)} x V in {', '.join(map(str, args.tokens))}, compressor"
             f"{'s' * several} {', '.join(args.compressors)}, {len(seeds)} training seed{'s' * (len(seeds) > 1)} per cell "
             f"({', '.join(map(str, seeds))}); stage 1 {args.stage1_steps} steps of {STAGE1_BATCH} samples, stage 2 "
             f"{args.stage2_steps} steps of {STAGE2_BATCH} (lr " +
             ", ".join(f"{size} {stage2_lr(size):g}" for size in args.sizes) + "); "
             f"{args.num_train} training images, {args.num_eval} held-out images. "
             f"Wall time of this invocation {seconds / 60:.1f} min. Accuracy in percent: the mean over the seeds "
             "(min-max) where there are several." + "".join(
                 f" Not made: {compressor} at V = {', '.join(map(str, tokens))} (it cannot make "
                 f"{'that count' if len(tokens) == 1 else 'those counts'} from the patch grid)."
                 for compressor, tokens in skipped.items() if tokens), ""]
    lines += summary.accuracy_table(rows, baselines, noisy)
    if ceilings:
        lines += summary.ceiling_section(rows, ceilings, categories, noisy, counts)
    if several:
        summary.plot_accuracy(out, rows, args)
        lines += ["![mean accuracy against V, per compressor and LLM size](accuracy_vs_tokens.png)", ""]
    if fits:
        lines += summary.fit_section(rows, fits, args)
    lines += curves
    paragraphs = [summary.findings([r for r in rows if r["compressor"] == compressor], fits.get(compressor, {}), noisy, baselines)
                  for compressor in args.compressors]
    if several:
        paragraphs = [f"*{compressor}*: {text}" for compressor, text in zip(args.compressors, paragraphs)]
    lines += ["## Does the toy world reproduce the paper?", "", "\n\n".join(paragraphs)]
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def grid_points(args):
    """-> the runs to make, (compressor, size, V, seed) each, and {compressor: the V of --tokens it
    cannot make (skipped)}. A compressor that makes none of them is refused, naming those it makes."""
    with vlm.loading("vision tower", args.vision):
        grid = vlm.vision_grid(args.vision)  # its config alone
    points, skipped = [], {}
    for compressor in args.compressors:
        made = [v for v in args.tokens if v in compressors.valid_tokens(compressor, grid)]
        if not made:
            try:
                compressors.check_token_count(args.tokens[0], grid, compressor)
            except ValueError as e:
                sys.exit(f"error: {e}")
        skipped[compressor] = [v for v in args.tokens if v not in made]
        points += [(compressor, size, v, seed) for size in args.sizes for v in made for seed in range(1, args.seeds + 1)]
    return points, skipped


def write_scores(out, rows):
    """scores.csv: a row per run and split, what 04_fit_scaling.py reads."""
    with open(os.path.join(out, "scores.csv"), "w", newline="") as f:
        columns = ["run", "compressor", "seed", "params_b", "tokens", "benchmark", "score", "score_all_types",
                   "loss_first", "loss_last"]
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def fit_laws(out, log, rows, noisy, baselines):
    """{compressor: {split: its fit.json, or {"failed": why}}}: 04_fit_scaling.py on each compressor's
    rows of scores.csv; none where the grid has one LLM size or one V (the law needs two of each)."""
    if len({r["params_b"] for r in rows}) < 2 or len({r["tokens"] for r in rows}) < 2:
        return {}
    fits = {}
    for compressor in dict.fromkeys(r["compressor"] for r in rows):
        made = {r["tokens"] for r in rows if r["compressor"] == compressor}
        fits[compressor] = {split: fit_law(out, log, compressor, split, noisy, baselines) if len(made) > 1 else
                            {"failed": f"it makes one V of the grid ({min(made)})"} for split in summary.SPLITS}
    return fits


def fit_law(out, log, compressor, split, noisy, baselines):
    """One compressor's law on one split: fit_COMPRESSOR_SPLIT.json and its plots in fit_COMPRESSOR_SPLIT/."""
    name = os.path.join(out, f"fit_{compressor}_{split}")
    if os.path.exists(name + ".json"):  # from an earlier invocation: replaced, or gone if this fit fails
        os.remove(name + ".json")
    if set(noisy[split]) == set(baselines[split]):  # nothing but answer priors to fit
        return {"failed": f"every question type {summary.NOT_LEARNED}"}
    try:
        run(log, "04_fit_scaling.py", "--scores", os.path.join(out, "scores.csv"), "--compressor", compressor,
            "--suite", summary.SPLITS[split], "--output-dir", name, "--bootstrap", "200")
    except StepFailed as e:  # e.g. every run at the same accuracy: say so in the summary
        print(f"warning: {e}")
        return {"failed": open(log).read().strip().splitlines()[-1]}
    shutil.copy(os.path.join(name, "fit.json"), name + ".json")
    return json.load(open(name + ".json"))


def main():
    args = parse_args()
    if args.print_real:
        for compressor in args.compressors:
            print_real(compressor)
        return
    started = time.time()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        if signal.getsignal(signum) is not signal.SIG_IGN:  # under nohup, SIGHUP stays ignored
            signal.signal(signum, end_with_the_demo)
    out = os.path.abspath(args.out)
    grid, skipped = grid_points(args)
    guard.lock_directory(out)  # one demo at a time in one --out
    check_settings(out, args)
    log = os.path.join(out, "demo.log")
    data = os.path.join(out, "data")

    bar = tqdm(total=1 + 3 * len(grid) + 1, desc="demo")
    if not os.path.exists(os.path.join(data, "finetune.json")):
        run(log, "-m", "toy.make_data", "--out", data, "--num-train", str(args.num_train),
            "--num-eval", str(args.num_eval), "--questions-per-image", str(QUESTIONS_PER_IMAGE))
    bar.update()
    pretrain_missing(log, args)
    ceilings = text_ceilings(out, data, args.sizes) if all(toy.is_toy(size) for size in args.sizes) else {}
    # the first stage 1 runs alone: it fills the feature cache the other runs then share
    train_and_evaluate(args, *grid[0], out, bar, stage1_only=True)
    # the largest models first, so the last to finish are short
    order = sorted(grid, key=lambda point: (-args.sizes.index(point[1]), -point[2]))
    try:
        with ThreadPoolExecutor(args.jobs) as pool:
            spent = dict(zip(order, pool.map(lambda point: train_and_evaluate(args, *point, out, bar), order)))
    except StepFailed as e:
        sys.exit(f"error: {e}")
    timings = {run_dirs(out, *point)[0]: spent[point] for point in grid}
    questions = {split: os.path.join(data, "eval", bench, "questions.jsonl") for split, bench in summary.SPLITS.items()}
    baselines = {split: summary.majority_baseline(path) for split, path in questions.items()}
    counts = {split: summary.question_counts(path) for split, path in questions.items()}
    rows = [row for point in grid for row in read_run(out, *point)]
    noisy = summary.noisy_types(rows, baselines)
    rows = summary.score_kept_types(rows, noisy, counts)

    write_scores(out, rows)
    fits = fit_laws(out, log, rows, noisy, baselines)
    bar.update()
    bar.close()
    seconds = time.time() - started
    timings["total"] = round(seconds, 1)
    with open(os.path.join(out, "timings.json"), "w") as f:
        json.dump(timings, f, indent=2)
    write_summary(out, rows, fits, baselines, noisy, args, seconds, skipped, summary.learning_curves(out, read_curves(out, grid), questions["reasoning"], CURVE_QUESTIONS),
                  ceilings, counts)
    print(open(os.path.join(out, "summary.md")).read())
    print(f"outputs in {out}")


if __name__ == "__main__":
    main()
