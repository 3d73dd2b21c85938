"""What trains is held and updated in fp32 whatever dtype the checkpoint stores (Qwen1.5 is bf16 on the hub,
Vicuna-1.5 fp16): a bf16 checkpoint trains exactly as its fp32 copy does; the trained LLM is saved in the
checkpoint's own dtype; the dtypes are logged, and accelerate's settings that are not taken are named.
LoRA, QLoRA, 8-bit AdamW and FSDP over a bf16 checkpoint: tests/test_scale_out.py."""
import json

import torch
from safetensors.torch import load_file

import distributed
from conftest import checkpoint_dtypes, run_script


def finetune(toy_data, llm, out, *extra, env=None):
    return run_script("02_finetune.py", "--llm", str(llm), "--vision", "toy", "--projector", "none",
                      "--data", str(toy_data / "finetune.json"), "--image-folder", str(toy_data / "images"),
                      "--output-dir", str(out), "--max-steps", "12", "--save-every", "6", "--batch-size", "4",
                      "--micro-batch-size", "4", "--num-workers", "0", *extra, env=env)


def test_a_bf16_checkpoint_trains_to_the_weights_of_its_fp32_copy(toy_data, toy_llm_dirs, tmp_path):
    """At lr 1e-4 an Adam update is below half a bf16 step for every weight above ~0.03 (a third of
    toy-s's): trained in bf16, those updates round away and the two runs part at the first step."""
    import os
    env = dict(os.environ, ACCELERATE_MIXED_PRECISION="fp16", ACCELERATE_USE_FSDP="true", FSDP_OFFLOAD_PARAMS="true",
               ACCELERATE_DYNAMO_BACKEND="INDUCTOR")
    logs, saved, stdout = {}, {}, {}
    for name, llm in toy_llm_dirs.items():
        result = finetune(toy_data, llm, tmp_path / name, "--lr", "1e-4", env=env if name == "bf16" else None)
        assert "precision: weights fp32 (trained), fp32 (frozen); compute fp32" in result.stdout
        stdout[name] = result.stdout
        logs[name] = [json.loads(line)["loss"] for line in open(tmp_path / name / "log.jsonl")]
        saved[name] = {k.removeprefix("llm."): v for k, v in load_file(tmp_path / name / "model.safetensors").items()
                       if k.startswith("llm.")}
        # the fp32 masters and the optimizer's states, as the checkpoint holds them
        dtypes = checkpoint_dtypes(tmp_path / name / "checkpoints" / "step-0000006")
        assert any(".exp_avg_sq" in key for key in dtypes) and set(dtypes.values()) == {torch.float32}
    # accelerate's settings that the script does not take are named, with what it does instead
    line = next(line for line in stdout["bf16"].splitlines() if line.startswith("accelerate launch"))
    assert "accelerate launch" not in stdout["fp32"]
    assert line.count("(here:") == 3 and "mixed_precision fp16 (here: fp32 weights, fp32 compute)" in line
    assert "FSDP (offload_params true) (here: torch FSDP2" in line and "dynamo_backend INDUCTOR" in line
    assert logs["bf16"] == logs["fp32"]
    # saved in the dtype each checkpoint came in: the same trained weights, rounded to bf16 for the bf16 one
    assert json.load(open(tmp_path / "bf16" / "config.json"))["dtype"] == "bfloat16"
    assert {t.dtype for t in saved["bf16"].values()} == {torch.bfloat16}
    assert {t.dtype for t in saved["fp32"].values()} == {torch.float32}
    assert all(torch.equal(saved["fp32"][k].bfloat16(), saved["bf16"][k]) for k in saved["bf16"])
    before = load_file(toy_llm_dirs["bf16"] / "model.safetensors")
    moved = sum((before[k] != saved["bf16"][k]).sum().item() for k in before) / sum(t.numel() for t in before.values())
    assert moved > 0.2, moved  # it trained: a fifth of the weights moved by a bf16 step or more


def test_accelerate_settings_that_match_the_script_are_not_named(monkeypatch):
    for key in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DYNAMO_BACKEND", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert distributed.accelerate_settings_not_taken(torch.bfloat16, "x", "y") is None
    assert "mixed_precision bf16 (here: x)" in distributed.accelerate_settings_not_taken(torch.float32, "x", "y")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
    assert distributed.accelerate_settings_not_taken(torch.float32, "x", "y") is None
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert distributed.accelerate_settings_not_taken(torch.float32, "x", "y").endswith("DeepSpeed (here: y)")
