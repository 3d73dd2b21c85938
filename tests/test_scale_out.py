"""FSDP, batch-split invariance, kill-safe resume, single-GPU savers: all on CPU, all on an LLM checkpoint
stored in bf16 as Qwen1.5's is (trained in fp32: tests/test_precision.py)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import vlm
from conftest import ROOT, checkpoint_dtypes, run_script

STEPS = 6


@pytest.fixture(scope="module")
def llm(toy_llm_dirs):
    return toy_llm_dirs["bf16"]


def finetune_args(toy_data, llm, out, *extra):
    return ["02_finetune.py", "--llm", str(llm), "--vision", "toy", "--tokens", "4",
            "--data", str(toy_data / "finetune.json"), "--image-folder", str(toy_data / "images"),
            "--output-dir", str(out), "--max-steps", str(STEPS), "--batch-size", "8",
            "--lr", "1e-3", "--num-workers", "0", "--projector", "none", *extra]


def losses(out):
    return [json.loads(line)["loss"] for line in open(os.path.join(out, "log.jsonl"))]


def tokens_per_sample(out):
    """Each step's real tokens per sample, as logged (the step's time cancels out)."""
    log = map(json.loads, open(os.path.join(out, "log.jsonl")))
    return [entry["tokens_per_s"] / entry["samples_per_s"] for entry in log]


@pytest.fixture(scope="module")
def reference_run(toy_data, llm, tmp_path_factory):
    """One process, micro-batch 4, checkpoints at steps 2 and 4: the run every other layout must
    reproduce."""
    out = tmp_path_factory.mktemp("reference")
    run_script(*finetune_args(toy_data, llm, out, "--micro-batch-size", "4", "--save-every", "2"))
    return out


@pytest.fixture(scope="module")
def reference(reference_run):
    return losses(reference_run)


def torchrun_env():
    # two ranks on two cores: one thread each, or they fight
    return dict(os.environ, OMP_NUM_THREADS="1")


def test_two_process_fsdp_shards_and_matches_one_process(toy_data, llm, tmp_path, reference):
    out = tmp_path / "fsdp"
    result = run_script("-m", "torch.distributed.run", "--nproc_per_node", "2",
                        *finetune_args(toy_data, llm, out, "--micro-batch-size", "2", "--save-every", "4"),
                        env=torchrun_env())
    line = next(l for l in result.stdout.splitlines() if l.startswith("FSDP:"))
    local, total = (float(x.rstrip("M")) for x in line.split("per rank ")[1].split(" of "))
    assert "world=2" in line and local < 0.6 * total  # really sharded: about half each
    got = losses(out)
    assert len(got) == STEPS
    for a, b in zip(got, reference):
        assert abs(a - b) <= 1e-4 * abs(b)
    assert (out / "model.safetensors").exists()  # consolidated at the end
    # the shards each rank wrote: fp32 weights and optimizer states, over the bf16 checkpoint
    dtypes = checkpoint_dtypes(out / "checkpoints" / "step-0000004")
    assert any("layers.0.mlp" in name and "exp_avg" in name for name in dtypes)
    assert set(dtypes.values()) == {torch.float32}


@pytest.mark.parametrize("split", [["--micro-batch-size", "1"], ["--micro-batch-size", "2", "--group-by-length"]])
def test_how_the_batch_is_split_does_not_change_the_losses(toy_data, llm, tmp_path, reference, split):
    run_script(*finetune_args(toy_data, llm, tmp_path, *split))
    for a, b in zip(losses(tmp_path), reference):
        assert abs(a - b) <= 1e-5 * abs(b)  # float32 sums taken in another order: relative noise


def test_kill_9_then_resume_gives_the_same_losses(toy_data, llm, tmp_path, reference):
    args = finetune_args(toy_data, llm, tmp_path, "--micro-batch-size", "4", "--save-every", "2")
    process = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "checkpoints" / "step-0000004"
    deadline = time.time() + 300
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL  # killed mid-run, not finished before the kill
    assert checkpoint.exists()
    result = run_script(*args, "--resume")
    assert "resumed from" in result.stdout
    got = losses(tmp_path)
    assert len(got) == STEPS
    for a, b in zip(got, reference):
        assert abs(a - b) <= 1e-5


def test_truncated_checkpoint_cut_log_line_and_deleted_records_are_survived(toy_data, llm, tmp_path, reference):
    """OUTPUT/records/ deleted by hand mid-run: training goes on from its open mapping and exits
    0. Then, as if killed after its last checkpoint while writing a log line, the newest
    checkpoint truncated: the resume uses the one before and keeps the log's whole lines."""
    args = finetune_args(toy_data, llm, tmp_path, "--micro-batch-size", "4", "--save-every", "2")
    process = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (tmp_path / "checkpoints" / "step-0000002").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    shutil.rmtree(tmp_path / "records")  # still there: the run has not finished
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    (tmp_path / "config.json").unlink()
    log = (tmp_path / "log.jsonl").read_text()
    (tmp_path / "log.jsonl").write_text(log[:-10])  # the last line cut short
    newest = tmp_path / "checkpoints" / "step-0000004"
    shard = next(p for p in newest.iterdir() if p.suffix == ".distcp")
    os.truncate(shard, shard.stat().st_size // 3)
    result = run_script(*args, "--resume")
    assert f"checkpoint {newest} is unusable" in result.stdout
    assert "resumed from" in result.stdout and "step-0000002 at step 2" in result.stdout
    assert len(losses(tmp_path)) == STEPS
    for a, b in zip(losses(tmp_path), reference):
        assert abs(a - b) <= 1e-5


def run_torchrun(args, timeout, env):
    """run_script under torchrun, for a run that may hang: on a timeout its workers end too (each
    runs in a session of its own; torchrun passes its SIGTERM on to them)."""
    process = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args], cwd=ROOT, text=True, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.terminate()
        process.communicate(timeout=60)
        raise AssertionError(f"no end after {timeout} s: {args}") from None
    assert process.returncode == 0, stderr[-5000:]
    return stdout


def test_resume_with_more_processes_than_the_checkpoint_had(toy_data, llm, tmp_path, reference_run, reference):
    """Checkpointed by one process, resumed by two: both load step 4 (rank 1 has no RNG state of
    its own and keeps --seed's) and the losses go on as if never interrupted."""
    shutil.copytree(reference_run, tmp_path, dirs_exist_ok=True)
    (tmp_path / vlm.CONFIG_FILE).unlink()  # as if killed after its last checkpoint
    stdout = run_torchrun(["--nproc_per_node", "2", *finetune_args(
        toy_data, llm, tmp_path, "--micro-batch-size", "2", "--save-every", "2", "--resume")], 300, torchrun_env())
    assert "step-0000004 was written by 1 process(es): rank(s) 1 keep the RNG state of --seed" in stdout
    assert "step-0000004 at step 4" in stdout
    assert len(losses(tmp_path)) == STEPS
    for a, b in zip(losses(tmp_path), reference):
        assert abs(a - b) <= 1e-4 * abs(b)


@pytest.mark.parametrize("saver", [["--lora", "8"], ["--qlora", "--packing"], ["--optim", "adamw8bit"]])
def test_single_gpu_savers_train_and_export(toy_data, llm, tmp_path, saver):
    run_script(*finetune_args(toy_data, llm, tmp_path, "--micro-batch-size", "8", *saver, "--lr", "3e-3",
                              "--save-every", "3"))
    got = losses(tmp_path)
    assert got[-1] < got[0] - 0.2, got
    # what trains is fp32 over the bf16 base: LoRA's adapters and their Adam states (8-bit AdamW's
    # states are 8-bit by design, its weights fp32)
    dtypes = checkpoint_dtypes(tmp_path / "checkpoints" / "step-0000003")
    keep = (lambda name: name.startswith("model.")) if "adamw8bit" in saver else (lambda name: "lora_" in name)
    trained = {name: dtype for name, dtype in dtypes.items() if keep(name)}
    assert any(".layers." in name for name in trained) and set(trained.values()) == {torch.float32}
    model, _, _ = vlm.load_pretrained(tmp_path)  # merged: loads like any other output
    assert not any("lora" in name for name, _ in model.llm.named_parameters())
    assert next(model.llm.parameters()).dtype == torch.bfloat16  # saved in the dtype its checkpoint came in


def trained_weights(out, prefix):
    """{name: tensor} of the part of a stage-2 output's model.safetensors under prefix (llm., projector.)."""
    from safetensors.torch import load_file
    return {k.removeprefix(prefix): v for k, v in load_file(out / "model.safetensors").items() if k.startswith(prefix)}


def assert_trained_alike(out, reference_run, initial):
    """The trained weights of two runs: the projector (saved in fp32) to summation order; the LLM, saved
    in bf16 as its checkpoint came, to one bf16 step (summation order carries a few weights across a
    rounding boundary) or, near zero, 1% of the lr (1e-3, about what one Adam step moves a weight)."""
    from safetensors.torch import load_file
    got, ref = trained_weights(out, "projector."), trained_weights(reference_run, "projector.")
    assert max((got[k] - ref[k]).abs().max().item() for k in ref) <= 1e-4
    got, ref = trained_weights(out, "llm."), trained_weights(reference_run, "llm.")
    start = load_file(initial / "model.safetensors")
    for name in ref:
        a, b = got[name].float(), ref[name].float()
        assert ((a - b).abs() <= 2 ** -7 * torch.maximum(a.abs(), b.abs()) + 1e-5).all(), name
    moved = sum((ref[k] != start[k]).sum().item() for k in ref) / sum(t.numel() for t in ref.values())
    assert moved > 0.5, moved


def test_packing_trains_as_unpacked_and_resumes_in_the_middle_of_its_epoch(toy_data, llm, tmp_path, reference_run):
    """--packing, one process: each step's 8 samples in 2 rows, one a micro-batch. The losses and the
    weights of the unpacked run; then, as if killed after its step-4 checkpoint (step 4 of a 20-step
    epoch), resumed: the same again."""
    args = finetune_args(toy_data, llm, tmp_path, "--micro-batch-size", "4", "--packing", "--save-every", "2")
    for resume in ([], ["--resume"]):
        result = run_script(*args, *resume)
        got = losses(tmp_path)
        assert len(got) == STEPS
        for a, b in zip(got, losses(reference_run)):
            assert abs(a - b) <= 1e-5 * abs(b)
        assert tokens_per_sample(tmp_path) == pytest.approx(tokens_per_sample(reference_run))  # samples, not rows
        assert_trained_alike(tmp_path, reference_run, llm)
        (tmp_path / vlm.CONFIG_FILE).unlink()  # not finished: --resume continues from step-0000004
    assert "resumed from" in result.stdout and "step-0000004 at step 4" in result.stdout


def test_packing_on_two_fsdp_processes_matches_one_unpacked_process(toy_data, llm, tmp_path, reference_run):
    """Each rank packs its share of a step into its 2 micro-batches, whatever the lengths: both ranks run
    the model as often (a rank short of one would hang the other in its collectives)."""
    run_torchrun(["--nproc_per_node", "2", *finetune_args(toy_data, llm, tmp_path, "--micro-batch-size", "2",
                                                          "--packing")], 300, torchrun_env())
    for a, b in zip(losses(tmp_path), losses(reference_run)):
        assert abs(a - b) <= 1e-4 * abs(b)
    assert_trained_alike(tmp_path, reference_run, llm)
