"""What a run leaves in its output directory, so that it can be killed and resumed and never mixes
with another run: the directory lock, training's stored settings and checkpoints, evaluation's
answer files and results. The scripts' loops call these; none of it changes what is computed.
"""
import glob
import hashlib
import json
import os
import random
import shutil
import warnings

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

import benchmarks
import vlm
from distributed import all_ranks, barrier, from_rank0
from guard import changed_settings, lock_directory

warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # DCP in one process is fine

# ---------------------------------------------------------------- training runs (01, 02)

# What a resume may change: how the run is carried out, not what it computes (the loss does
# not depend on how a global batch is split or packed; docs/training.md). --skip-bad-samples only
# lets a run go on past a record it would stop at; the records a run takes are checked apart (data_change).
MAY_CHANGE_ON_RESUME = {"resume", "overwrite", "output_dir", "num_workers", "save_every", "micro_batch_size",
                        "packing", "grad_checkpointing", "image_folder", "feature_cache", "show_samples",
                        "skip_bad_samples", "eval_every", "eval_bench", "eval_limit", "eval_data_root",
                        "eval_max_new_tokens"}


def run_settings(args, world):
    """The settings that define a run, stored with each checkpoint and the final output. Under
    --loss-norm llava each micro-batch's mean is averaged, so how a global batch is split (the
    micro-batch size and the number of processes) changes the loss and defines the run too."""
    settings = {k: v for k, v in sorted(vars(args).items()) if k not in MAY_CHANGE_ON_RESUME}
    if args.loss_norm == "llava":
        settings.update(micro_batch_size=args.micro_batch_size, processes=world)
    return settings


def stored_runs(directory):
    """(path, what it stores: settings, data, ...) of each checkpoint and the final output in
    directory. An unreadable checkpoint is skipped here: it is reported, and skipped, when loaded."""
    paths = [os.path.join(d, "trainer_state.json") for d in checkpoint_dirs(directory)]
    for path in filter(os.path.exists, paths + [os.path.join(directory, vlm.CONFIG_FILE)]):
        try:
            with open(path) as f:
                yield path, json.load(f)
        except (OSError, ValueError):
            continue


def prepare_output_dir(args, rank, world):
    """Lock the output directory and make sure one run never mixes with another there:
    without --resume, a directory holding a run is refused (--overwrite deletes it); with
    --resume, the stored settings must equal this run's. -> True if the run already finished."""
    directory = args.output_dir
    if rank == 0:
        lock_directory(directory)
    final_config = os.path.join(directory, vlm.CONFIG_FILE)
    holds = [name for name in ("checkpoints", "log.jsonl", vlm.CONFIG_FILE)
             if os.path.exists(os.path.join(directory, name))]
    if args.overwrite:
        if rank == 0:
            for name in ("checkpoints", "log.jsonl", vlm.CONFIG_FILE, vlm.PROJECTOR_FILE, "llm", "tokenizer"):
                path = os.path.join(directory, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.path.exists(path) and os.remove(path)
        barrier()
        return False
    if holds and not args.resume:
        raise SystemExit(f"error: {directory} holds another run ({', '.join(holds)}); pass --resume to continue "
                         "it or --overwrite to delete it and start over")
    settings = run_settings(args, world)
    for path, stored in stored_runs(directory):
        saved = stored.get("settings")
        changed = changed_settings(saved, settings, {"processes": "processes"}) if saved is not None else []
        if changed:
            split = any(saved.get(k) != settings.get(k) for k in ("micro_batch_size", "processes"))
            why = " (under --loss-norm llava how each global batch is split changes the loss)" if split else ""
            raise SystemExit(f"error: --resume would change the run in {directory}: {'; '.join(changed)}{why} "
                             f"(stored in {path}); use the run's settings, or --overwrite to start over")
    return os.path.exists(final_config)


def data_change(directory, data_file, data):
    """A resumed run must take the records it began with (the file at the same path may have been
    rewritten, another image folder may hold other images to skip). data: llava_data.write_records'
    fingerprint. -> why this run's records differ from those stored in directory, or None."""
    for path, stored in stored_runs(directory):
        theirs = stored.get("data")
        if theirs != data:
            began = f"{theirs['records']} records, sha1 {theirs['sha1']}" if theirs else "not stored (an earlier version)"
            return (f"--resume would change the run in {directory}: the records taken from {data_file} are not those "
                    f"it began with ({began} -> {data['records']} records, sha1 {data['sha1']}; stored in {path}); "
                    "use the run's data file and image folder, or --overwrite to start over")
    return None


def checkpoint_dirs(output_dir):
    return sorted(glob.glob(os.path.join(output_dir, "checkpoints", "step-*[0-9]")))


def save_checkpoint(model, optimizer, step, output_dir, rank, run):
    """Sharded (torch.distributed.checkpoint) so FSDP ranks each write their part. Written to
    a temporary directory and renamed: a crash mid-write leaves the previous one intact.
    run: what defines the run (settings, data), stored beside the step."""
    final = os.path.join(output_dir, "checkpoints", f"step-{step:07d}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    options = StateDictOptions(ignore_frozen_params=True)
    state = {"model": get_model_state_dict(model, options=options),
             "optim": get_optimizer_state_dict(model, optimizer, options=options)}
    dcp.save(state, checkpoint_id=tmp)
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save(rng, os.path.join(tmp, f"rng-rank{rank}.pt"))
    barrier()
    if rank == 0:
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump({"step": step, **run}, f)
        shutil.rmtree(final, ignore_errors=True)  # a run restarted from scratch overwrites
        os.rename(tmp, final)
        for old in checkpoint_dirs(output_dir)[:-2]:  # keep the newest two
            shutil.rmtree(old)
    barrier()


def load_newest_checkpoint(model, optimizer, output_dir, rank, world):
    """-> the step to continue from (0 if none). Every rank loads the same checkpoint, from rank
    0's list; one that fails to load on any rank (truncated, half-deleted) is reported and the one
    before it is tried by all. Ranks a checkpoint has no RNG state for (it was written by fewer
    processes) keep the state --seed gave them."""
    for directory in reversed(from_rank0(checkpoint_dirs(output_dir))):
        error = None
        try:
            options = StateDictOptions(ignore_frozen_params=True)
            state = {"model": get_model_state_dict(model, options=options),
                     "optim": get_optimizer_state_dict(model, optimizer, options=options)}
            dcp.load(state, checkpoint_id=directory)
            # not strict: the frozen vision tower is deliberately absent from checkpoints
            loading = StateDictOptions(ignore_frozen_params=True, strict=False)
            set_model_state_dict(model, state["model"], options=loading)
            set_optimizer_state_dict(model, optimizer, state["optim"], options=loading)
            rng_file = os.path.join(directory, f"rng-rank{rank}.pt")
            rng = torch.load(rng_file, weights_only=False) if os.path.exists(rng_file) else None
            with open(os.path.join(directory, "trainer_state.json")) as f:
                step = json.load(f)["step"]
        except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else ""
            error = f"[rank {rank}] {type(e).__name__} {reason}".strip()
        errors = [e for e in all_ranks(error) if e]
        if errors:
            if rank == 0:
                print(f"checkpoint {directory} is unusable ({'; '.join(errors)}); trying the previous one")
            continue
        if rng is not None:
            random.setstate(rng["python"]), np.random.set_state(rng["numpy"]), torch.set_rng_state(rng["torch"])
        written_by = len(glob.glob(os.path.join(directory, "rng-rank*.pt")))
        if rank == 0 and written_by < world:
            print(f"{directory} was written by {written_by} process(es): rank(s) "
                  f"{', '.join(map(str, range(written_by, world)))} keep the RNG state of --seed")
        if rank == 0:
            print(f"resumed from {directory} at step {step}")
        return step
    if checkpoint_dirs(output_dir):  # a failed load may have written into the weights already
        raise SystemExit(f"error: no checkpoint in {output_dir}/checkpoints could be loaded")
    if rank == 0:
        print(f"no checkpoint in {output_dir}/checkpoints; starting from step 0")
    return 0


# ---------------------------------------------------------------- evaluations (03)

def answer_parts(folder):
    return sorted(glob.glob(os.path.join(folder, "answers.part-*.jsonl")))


def answer_files(folder):
    return [path for path in [os.path.join(folder, "answers.jsonl")] + answer_parts(folder) if os.path.exists(path)]


def read_answer_rows(path):
    """The rows of one answer file. A last line cut off by a kill is ignored: its batch is
    answered again."""
    rows = []
    for number, line in enumerate(open(path), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        problem = benchmarks.answer_problem(row) if isinstance(row, dict) else "not a JSON object"
        if problem:
            raise SystemExit(f"error: {path}:{number}: {problem}")
        rows.append(row)
    return rows


def read_answered(folder):
    """{question_id: answer row} from the merged file and every part file."""
    answered = {}
    for path in answer_files(folder):
        for row in read_answer_rows(path):
            answered.setdefault(str(row["question_id"]), row)
    return answered


def model_fingerprint(directory):
    """sha1 of the files that make the model's answers: its config, generation settings and weights
    (stage 1's projector; a model folder's, the whole LLM: docs/evaluation.md). Every answer carries it."""
    digest = hashlib.sha1()
    files = [vlm.CONFIG_FILE] + [name for name in [vlm.GENERATION_CONFIG_FILE] if os.path.exists(os.path.join(
        directory, name))] + sorted(os.path.basename(f) for f in glob.glob(os.path.join(directory, "*.safetensors")))
    for name in files:
        digest.update(name.encode())
        with open(os.path.join(directory, name), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def questions_fingerprint(bench, questions):
    """sha1 of what each question shows the model, in order: its id, image file and prompt. Batches,
    and which process answers what, follow from the list, so an answer is reused only when the
    whole list is unchanged; a corrected reference answer changes nothing here."""
    asked = [[q["question_id"], q["image"], benchmarks.build_prompt(bench, q)] for q in questions]
    return hashlib.sha1(json.dumps(asked).encode()).hexdigest()[:16]


def check_earlier_outputs(output_dir, identity, questions, params_b, overwrite):
    """Answers and results in output_dir must come from this model with these settings (identity),
    and, for the benchmarks this run evaluates, from these questions ({benchmark: fingerprint});
    results rows must carry this run's --params-b, or one model would be two sizes in the fit.
    Reusing them would score another model, or answers to other questions. Refused, or deleted
    with --overwrite."""
    def expected(bench, **more):
        return dict(identity, **({"questions": questions[bench]} if bench in questions else {}), **more)

    def mismatch(pairs):  # the first (identity stored, identity wanted) that differ, or None
        return next(((theirs, want) for theirs, want in pairs if any(theirs.get(k) != v for k, v in want.items())),
                    None)

    found = []  # (path, its first mismatch): the answers first, which the results come from
    for folder in sorted(glob.glob(os.path.join(output_dir, "*", ""))):
        want = expected(os.path.basename(os.path.dirname(folder)))
        found += [(path, mismatch((row.get("metadata") or {}, want) for row in read_answer_rows(path)))
                  for path in answer_files(folder)]
    results = os.path.join(output_dir, "results.jsonl")
    if os.path.exists(results):
        rows = [json.loads(line) for line in open(results)]
        found.append((results, mismatch((row.get("identity") or {}, expected(row.get("benchmark"), params_b=params_b))
                                        for row in rows)))
    found = [(path, pair) for path, pair in found if pair]
    if found and not overwrite:
        path, (theirs, want) = found[0]
        differs = [f"{k} {theirs.get(k)!r}, this run {v!r}" for k, v in want.items() if theirs.get(k) != v]
        raise SystemExit(f"error: {path} was written for another model, setting or question file "
                         f"({'; '.join(differs)}); use another --output-dir, or --overwrite to delete "
                         f"{len(found)} such file(s)")
    for path, _ in found:
        os.remove(path)
        metrics = os.path.join(os.path.dirname(path), "metrics.json")
        if path != results and os.path.exists(metrics):
            os.remove(metrics)


def open_for_append(path):
    """Append mode that first ends a line cut off by a kill, or the next row would join it."""
    f = open(path, "a+")
    if f.tell():
        f.seek(f.tell() - 1)
        if f.read(1) != "\n":
            f.write("\n")
    return f


def merge_answers(folder, questions):
    """One answers.jsonl in question order, no duplicate; the part files go."""
    answered = read_answered(folder)
    rows = [answered[str(q["question_id"])] for q in questions if str(q["question_id"]) in answered]
    tmp = os.path.join(folder, "answers.jsonl.tmp")
    with open(tmp, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    os.replace(tmp, os.path.join(folder, "answers.jsonl"))
    for path in answer_parts(folder):
        os.remove(path)
    return rows


def write_results(output_dir, rows):
    """results.jsonl keeps rows of benchmarks evaluated before and replaces those redone. -> its rows."""
    path = os.path.join(output_dir, "results.jsonl")
    old = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    redone = {r["benchmark"] for r in rows}
    with open(path + ".tmp", "w") as f:
        kept = [r for r in old if r["benchmark"] not in redone] + rows
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(path + ".tmp", path)  # a kill never leaves half a results file
    return kept
