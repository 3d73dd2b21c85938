"""Evaluate a trained VLM on benchmarks the way LLaVA-1.5 does, and score like the official scorers.

    python 03_evaluate.py --model runs/Qwen1.5-7B-Chat-quecc-v4/stage2 --bench gqa,pope,mme
                                    # reads data/eval/BENCH/, writes MODEL/eval (--data-root, --output-dir)
    accelerate launch 03_evaluate.py ...          # questions split across processes, merged once
    python 03_evaluate.py --score-only --bench pope --questions Q.jsonl --answers A.jsonl

One question about your own images: generate.py.

Layout: DATA_ROOT/BENCH/questions.jsonl (see data_prep/convert_benchmarks.py) and
DATA_ROOT/BENCH/images/. Output: OUTPUT_DIR/BENCH/answers.jsonl (LLaVA's answer format),
OUTPUT_DIR/BENCH/metrics.json, and OUTPUT_DIR/results.jsonl with one row per benchmark for
04_fit_scaling.py. Answers are appended as they come; a rerun skips answered questions.
"""
import argparse
import json
import os

import torch
from tqdm import tqdm

import benchmarks
import conversation
import distributed
import evaluation
import guard
import runs
import vlm


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="output directory of 02_finetune.py (or 01)")
    p.add_argument("--bench", help="comma-separated: " + ", ".join(benchmarks.BENCHMARKS))
    p.add_argument("--data-root", default="data/eval", help="folder holding BENCH/questions.jsonl and BENCH/images/")
    p.add_argument("--output-dir", help="default MODEL/eval")
    p.add_argument("--batch-size", type=int, default=evaluation.BATCH_SIZE)
    p.add_argument("--feature-cache", metavar="DIR", help="encode each image once with the frozen vision tower, "
                   "store its features in DIR (fp16) and reuse them across questions and models")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--score-only", action="store_true", help="score --answers against --questions")
    p.add_argument("--questions")
    p.add_argument("--answers")
    p.add_argument("--overwrite", action="store_true",
                   help="delete answers in --output-dir that another model or other settings wrote, and start over")
    p.add_argument("--params-b", type=float, metavar="B", help="the LLM's nominal size in billions for results.jsonl's "
                   "params_b, as the paper's fit uses (0.5, 1.8, 4, 7); default: the counted parameters")
    args = p.parse_args()
    for name in ("batch_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.params_b is not None and args.params_b <= 0:
        p.error(f"--params-b {args.params_b}: must be a positive number of billions")
    if args.score_only:
        if not (args.bench and args.questions and args.answers):
            p.error("--score-only needs --bench, --questions and --answers")
    elif not (args.model and args.bench):
        p.error("evaluation needs --model and --bench")
    if args.model and not args.output_dir:
        args.output_dir = os.path.join(args.model, "eval")
    return args


def answer_identity(args, world):
    """What makes an answer: the model (directory and weights) and the generation settings
    (the batches, and so the padding, depend on the batch size and the number of processes).
    Each benchmark's answers add its questions (runs.questions_fingerprint)."""
    return dict(model=os.path.abspath(args.model), fingerprint=runs.model_fingerprint(args.model),
                max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, processes=world,
                cached_features=bool(args.feature_cache))  # fp16 features: answers may differ in the last digits


# ---------------------------------------------------------------- generation

def generate_answers(model, tokenizer, image_processor, bench, questions, image_folder, folder, args,
                     rank, world, device, identity, cache):
    answered = runs.read_answered(folder)
    mine = questions[rank::world]
    todo = evaluation.batches_to_answer(mine, args.batch_size, answered)
    prompts = evaluation.Prompts(bench, mine, image_folder, tokenizer, image_processor, model.config, cache)
    loader = torch.utils.data.DataLoader(
        prompts, batch_sampler=todo, num_workers=2,
        collate_fn=lambda s: (s, None if any("error" in x for x in s) else
                              conversation.collate(s, tokenizer.pad_token_id, left=True)))
    part = os.path.join(folder, f"answers.part-{rank}.jsonl")
    model_id = os.path.basename(os.path.normpath(args.model))
    with runs.open_for_append(part) as f:
        for indices, (samples, batch) in zip(todo, tqdm(loader, desc=bench, disable=rank != 0)):
            if batch is None:
                evaluation.fail(next(x["error"] for x in samples if "error" in x))
            batch = conversation.to_device(batch, device)
            texts = vlm.generate(model, tokenizer, batch, args.max_new_tokens)
            rows = [dict(question_id=mine[i]["question_id"], prompt=s["prompt"], text=text,
                         answer_id=f"{model_id}-{mine[i]['question_id']}", model_id=model_id, metadata=identity)
                    for i, s, text in zip(indices, samples, texts) if str(mine[i]["question_id"]) not in answered]
            f.write("".join(json.dumps(row) + "\n" for row in rows))  # one write per batch
            f.flush()


def result_row(model, bench, metrics, identity, params_b=None):
    """params_b: the nominal size (--params-b) or, without one, the counted parameters, which
    params_counted_b always keeps (Qwen1.5-7B-Chat counts 7.72B, the paper calls it 7). The row's
    identity is its answers' and --params-b: one model, one size in results.jsonl."""
    counted = sum(p.numel() for p in model.llm.parameters()) / 1e9
    return dict(identity=dict(identity, params_b=params_b), llm=model.config.llm, params_b=params_b or counted,
                params_counted_b=counted, tokens=model.config.tokens, compressor=model.config.compressor,
                benchmark=bench, **evaluation.headline(metrics))


# ---------------------------------------------------------------- modes

def score_only(args):
    try:
        benchmarks.get_benchmark(args.bench)  # a wrong name fails before the files are read
        questions, answers = benchmarks.load_questions(args.questions), benchmarks.read_answers(args.answers)
    except (OSError, ValueError) as e:
        evaluation.fail(e)
    try:
        metrics = benchmarks.score(args.bench, questions, answers)
    except ValueError as e:  # the answers are not to these questions
        evaluation.fail(f"{args.answers} against {args.questions}: {e}")
    print(json.dumps(metrics, indent=2))


def main():
    args = parse_args()
    if args.score_only:
        return score_only(args)
    rank, world, device = distributed.setup_distributed()
    benches = {name: evaluation.read_benchmark(args.data_root, name) for name in args.bench.split(",")}
    model, tokenizer, image_processor = vlm.load_pretrained(
        args.model, dtype=torch.bfloat16 if device.type == "cuda" else None)
    model.to(device).eval()
    dtype = next(model.llm.parameters()).dtype
    not_taken = distributed.accelerate_settings_not_taken(
        dtype, f"{str(dtype).removeprefix('torch.')} weights and compute",
        "each process holds the whole model and answers its share of the questions")
    if not_taken and rank == 0:
        print(not_taken)
    identity = distributed.from_rank0(answer_identity(args, world) if rank == 0 else None)  # one read of the weights
    asked = {bench: runs.questions_fingerprint(bench, questions) for bench, questions in benches.items()}
    if rank == 0:  # one run per output directory at a time, and never another model's answers
        guard.lock_directory(args.output_dir)
        runs.check_earlier_outputs(args.output_dir, identity, asked, args.params_b, args.overwrite)
    distributed.barrier()  # no rank appends to an answer file before rank 0 has checked it
    cache = args.feature_cache and evaluation.feature_cache(args.feature_cache, model, image_processor, benches,
                                                            args.data_root, rank)

    rows = []
    for bench, questions in benches.items():
        answers_identity = dict(identity, questions=asked[bench])
        folder = os.path.join(args.output_dir, bench)
        os.makedirs(folder, exist_ok=True)
        generate_answers(model, tokenizer, image_processor, bench, questions,
                         os.path.join(args.data_root, bench, "images"), folder, args, rank, world, device,
                         answers_identity, cache or None)
        distributed.barrier()
        if rank == 0:
            answers = runs.merge_answers(folder, questions)
            metrics = benchmarks.score(bench, questions, answers)
            with open(os.path.join(folder, "metrics.json"), "w") as f:
                json.dump(metrics, f, indent=2)
            rows.append(result_row(model, bench, metrics, answers_identity, args.params_b))
            print(f"{bench}: {metrics['headline']} = {metrics[metrics['headline']]:.2f} "
                  f"(normalized {metrics['normalized']:.4f}, {len(answers)} answers)")
        distributed.barrier()
    if rank == 0:
        results = runs.write_results(args.output_dir, rows)
        if vlm.is_model_folder(args.model):  # its model card shows the scores
            vlm.write_model_card(args.model, model.config, results)
    distributed.end_distributed()


if __name__ == "__main__":
    main()
