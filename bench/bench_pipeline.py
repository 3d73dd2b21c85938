"""Benchmark: the whole pipeline at the real shapes, 2 processes on CPU, as a user runs it.

Random-init Qwen1.5-0.5B and CLIP-L/336 shapes written like hub checkpoints
(common.save_real_shape_models: the real vocabulary of 151,936, the 24x24 grid,
QueCC's key layers 12, 16, 22, 23), the toy world's images resized to 336 px. Each stage is
run by torchrun with --processes processes: one optimizer step of stage 1, one of stage 2
(the LLM sharded with FSDP2, its output consolidated), then one evaluation batch per process.
Per stage: wall seconds and the peak resident memory of its largest process (the rusage of
the torchrun process tree, in which each rank is one process).

    python bench/bench_pipeline.py --out out/bench_pipeline.json
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

from common import ROOT, print_table, save_real_shape_models, write_json

import vlm  # noqa: E402  (common put the repository on the path)


def run_stage(name, script_args, processes):
    """torchrun one script -> dict(stage, seconds, peak_rss_gb of its largest process)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), *script_args]
    start = time.time()
    process = subprocess.Popen(command, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    _, status, usage = os.wait4(process.pid, 0)  # ru_maxrss: the largest process of the tree, in KiB
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"error: {name} failed ({process.returncode}): {' '.join(command)}")
    row = dict(stage=name, seconds=time.time() - start, peak_rss_gb=usage.ru_maxrss * 1024 / 1e9)
    print(f"{name}: {row['seconds']:.0f} s, largest process {row['peak_rss_gb']:.2f} GB")
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--tokens", type=int, default=576, help="visual tokens V")
    args = p.parse_args()
    n = args.processes
    with tempfile.TemporaryDirectory() as work:
        start = time.time()
        llm, vision = save_real_shape_models(os.path.join(work, "models"))
        data = os.path.join(work, "data")
        subprocess.run([sys.executable, "-m", "toy.make_data", "--out", data, "--num-train", str(4 * n),
                        "--num-eval", "2"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # one evaluation batch per process: the first n questions of one held-out split
        bench = "toy_reasoning"
        root = os.path.join(work, "eval")
        os.makedirs(os.path.join(root, bench))
        os.symlink(os.path.join(data, "eval", bench, "images"), os.path.join(root, bench, "images"))
        with open(os.path.join(data, "eval", bench, "questions.jsonl")) as f:
            questions = f.readlines()[:n]
        with open(os.path.join(root, bench, "questions.jsonl"), "w") as f:
            f.writelines(questions)
        print(f"models and data written in {time.time() - start:.0f} s")

        common = ["--llm", llm, "--vision", vision, "--tokens", str(args.tokens), "--image-folder",
                  os.path.join(data, "images"), "--max-steps", "1", "--batch-size", str(n),
                  "--micro-batch-size", "1", "--num-workers", "0"]
        stage1, stage2 = os.path.join(work, "stage1"), os.path.join(work, "stage2")
        rows = [run_stage("stage 1 step", ["01_pretrain_projector.py", *common, "--output-dir", stage1,
                                           "--data", os.path.join(data, "pretrain.json")], n),
                run_stage("stage 2 step", ["02_finetune.py", *common, "--output-dir", stage2, "--projector", stage1,
                                           "--data", os.path.join(data, "finetune.json")], n),
                run_stage("evaluation batch", ["03_evaluate.py", "--model", stage2, "--bench", bench,
                                               "--data-root", root, "--output-dir", os.path.join(work, "answers"),
                                               "--batch-size", "1", "--max-new-tokens", "4"], n)]
        config = vlm.read_config(stage2)
        config.vocabulary = config.text_config.vocab_size
    print_table(["stage", "seconds", "largest process GB"],
                [[r["stage"], f"{r['seconds']:.0f}", f"{r['peak_rss_gb']:.2f}"] for r in rows])
    shapes = {k: getattr(config, k) for k in ("tokens", "grid", "key_layers", "vision_width", "llm_width", "vocabulary")}
    print(f"shapes: {shapes}")
    write_json(args.out, dict(benchmark="pipeline", processes=n, shapes=shapes, rows=rows))


if __name__ == "__main__":
    main()
