"""The toy world end to end on a CPU: data, stage 1, stage 2, evaluation. Nothing downloaded.

    python demo.py                      # one toy VLM (toy-s, 4 visual tokens)
    python demo.py --sizes toy-xs,toy-s,toy-m --tokens 1,4,16,144   # a grid, then the fit

Every step runs the project's own scripts as a user would, and is skipped when its output
already exists, so a killed demo picks up where it stopped. Outputs in --out: data/, runs/,
scores.csv and, for a grid, fit_reasoning/ and fit_ocr/ from 04_fit_scaling.py.
"""
import argparse
import csv
import json
import os
import subprocess
import sys

from tqdm import tqdm

ROOT = os.path.dirname(os.path.abspath(__file__))


def run(*args):
    """A repo script in a subprocess; its output goes to the log, a failure stops the demo."""
    with open(LOG, "a") as log:
        log.write(f"\n$ {' '.join(args)}\n")
        log.flush()
        if subprocess.run([sys.executable, *args], cwd=ROOT, stdout=log, stderr=log).returncode:
            sys.exit(f"error: {' '.join(args[:1])} failed; see {LOG}")


def losses(directory):
    return [json.loads(line)["loss"] for line in open(os.path.join(directory, "log.jsonl"))]


def main():
    global LOG
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--sizes", default="toy-s", help="toy LLM presets, comma-separated")
    p.add_argument("--tokens", default="4", help="visual token counts, comma-separated")
    p.add_argument("--compressor", default="quecc")
    p.add_argument("--vision", default="toy", help="toy, or a directory of a CLIP vision model")
    p.add_argument("--stage1-steps", type=int, default=60)
    p.add_argument("--stage2-steps", type=int, default=300)
    p.add_argument("--num-train", type=int, default=2000)
    args = p.parse_args()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    LOG = os.path.join(out, "demo.log")
    data, cache = os.path.join(out, "data"), os.path.join(out, "cache")
    sizes, token_counts = args.sizes.split(","), [int(t) for t in args.tokens.split(",")]
    grid = [(size, tokens) for size in sizes for tokens in token_counts]

    bar = tqdm(total=1 + 3 * len(grid), desc="demo")
    if not os.path.exists(os.path.join(data, "finetune.json")):
        run("data_prep/make_toy_data.py", "--out", data, "--num-train", str(args.num_train))
    bar.update()
    common = ["--vision", args.vision, "--image-folder", os.path.join(data, "images"), "--feature-cache", cache,
              "--compressor", args.compressor, "--num-workers", "0"]
    rows = []
    for size, tokens in grid:
        name = f"{size}-v{tokens}"
        stage1, stage2, evaluation = (os.path.join(out, "runs", name, part) for part in ("stage1", "stage2", "eval"))
        bar.set_postfix(run=name)
        if not os.path.exists(os.path.join(stage1, "projector.safetensors")):
            run("01_pretrain_projector.py", "--llm", size, "--tokens", str(tokens), *common,
                "--data", os.path.join(data, "pretrain.json"), "--output-dir", stage1,
                "--max-steps", str(args.stage1_steps), "--batch-size", "32")
        bar.update()
        if not os.path.exists(os.path.join(stage2, "llm")):
            run("02_finetune.py", "--llm", size, "--tokens", str(tokens), *common, "--projector", stage1,
                "--data", os.path.join(data, "finetune.json"), "--output-dir", stage2,
                "--max-steps", str(args.stage2_steps), "--batch-size", "16", "--lr", "3e-3")
        bar.update()
        if not os.path.exists(os.path.join(evaluation, "results.jsonl")):
            run("03_evaluate.py", "--model", stage2, "--bench", "toy_reasoning,toy_ocr", "--max-new-tokens", "8",
                "--data-root", os.path.join(data, "eval"), "--output-dir", evaluation, "--batch-size", "32")
        bar.update()
        first, last = losses(stage2)[:10], losses(stage2)[-10:]
        for result in map(json.loads, open(os.path.join(evaluation, "results.jsonl"))):
            rows.append(dict(run=name, params_b=result["params_b"], tokens=tokens, benchmark=result["benchmark"],
                             score=result["normalized"], stage2_loss_first=sum(first) / len(first),
                             stage2_loss_last=sum(last) / len(last)))
    bar.close()

    with open(os.path.join(out, "scores.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"\n{'run':<14} {'benchmark':<14} {'accuracy':>8}   stage-2 loss (first 10 -> last 10 steps)")
    for r in rows:
        print(f"{r['run']:<14} {r['benchmark']:<14} {100 * r['score']:>7.1f}%   "
              f"{r['stage2_loss_first']:.3f} -> {r['stage2_loss_last']:.3f}")
    if len(sizes) > 1 and len(token_counts) > 1:  # the law needs more than one N and one V
        for split in ("reasoning", "ocr"):
            run("04_fit_scaling.py", "--scores", os.path.join(out, "scores.csv"), "--suite", f"toy_{split}",
                "--output-dir", os.path.join(out, f"fit_{split}"), "--bootstrap", "200")
            fit = json.load(open(os.path.join(out, f"fit_{split}", "fit.json")))
            print(f"fit {split}: alpha = {fit['alpha']:.4f} {fit['alpha_ci']}, beta = {fit['beta']:.4f} {fit['beta_ci']}")
    print(f"outputs in {out}")


if __name__ == "__main__":
    main()
