"""The command as typed: LLaVA's data layout under data/, outputs under runs/, and one-line messages
when data, stage 1 or a model is missing."""
import json
import os
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import ROOT, run_script

TOY = ["--llm", "toy", "--vision", "toy", "--num-workers", "0"]
# LLaVA-665K's image folders (docs/data.md): the toy images spread over them
FOLDERS = ["coco/train2017", "gqa/images", "ocr_vqa/images", "textvqa/train_images", "vg/VG_100K"]


def lay_out_llava(toy_data, root):
    """A tiny LLaVA layout: data/LLaVA-Pretrain/ (stage 1), data/llava_v1_5_mix665k.json with its
    images in the 665K folders (stage 2), data/eval/toy_reasoning/ (03)."""
    data = root / "data"
    pretrain = json.load(open(toy_data / "pretrain.json"))[:16]
    for record in pretrain:
        target = data / "LLaVA-Pretrain" / "images" / "00000" / record["image"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(toy_data / "images" / record["image"], target)
        record["image"] = f"00000/{record['image']}"
    (data / "LLaVA-Pretrain" / "blip_laion_cc_sbu_558k.json").write_text(json.dumps(pretrain))
    finetune = json.load(open(toy_data / "finetune.json"))[:16]
    for k, record in enumerate(r for r in finetune if "image" in r):
        target = data / FOLDERS[k % len(FOLDERS)] / record["image"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(toy_data / "images" / record["image"], target)
        record["image"] = f"{FOLDERS[k % len(FOLDERS)]}/{record['image']}"
    (data / "llava_v1_5_mix665k.json").write_text(json.dumps(finetune))
    shutil.copytree(toy_data / "eval" / "toy_reasoning", data / "eval" / "toy_reasoning")
    return root


@pytest.fixture(scope="module")
def layout(toy_data, tmp_path_factory):
    return lay_out_llava(toy_data, tmp_path_factory.mktemp("user"))


def one_line_error(result):
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def projector_of(model_folder):
    """The projector's tensors in a stage-2 output (model.safetensors holds llm.*, vision.*, projector.*)."""
    return {k.removeprefix("projector."): v for k, v in load_file(model_folder / "model.safetensors").items()
            if k.startswith("projector.")}


def test_the_command_as_typed_runs_on_the_default_layout(layout):
    """01, 02 and 03 with no path given: data from data/, outputs in runs/toy-quecc-v4/stage1|stage2,
    stage 2 starts from stage 1's projector (its standardization statistics, which training does
    not change, arrive unchanged), 03 reads data/eval and writes MODEL/eval."""
    steps = ["--max-steps", "1", "--batch-size", "8"]
    run_script("01_pretrain_projector.py", *TOY, *steps, "--standardize-features", cwd=layout)
    stage1, stage2 = layout / "runs/toy-quecc-v4/stage1", layout / "runs/toy-quecc-v4/stage2"
    assert (stage1 / "projector.safetensors").exists()
    run_script("02_finetune.py", *TOY, *steps, cwd=layout)
    before, after = load_file(stage1 / "projector.safetensors"), projector_of(stage2)
    assert after["standardize_patches.std"].ne(1).any()  # measured statistics, not a fresh projector's
    for name in ("standardize_patches.mean", "standardize_patches.std"):
        assert after[name].equal(before[name])
    fresh = layout / "runs/fresh/stage2"
    run_script("02_finetune.py", *TOY, *steps, "--projector", "none", "--output-dir", str(fresh), cwd=layout)
    assert not projector_of(fresh)["standardize_patches.std"].equal(before["standardize_patches.std"])

    run_script("03_evaluate.py", "--model", "runs/toy-quecc-v4/stage2", "--bench", "toy_reasoning", cwd=layout)
    rows = [json.loads(line) for line in open(stage2 / "eval" / "results.jsonl")]
    assert [r["benchmark"] for r in rows] == ["toy_reasoning"]
    message = one_line_error(run_script("03_evaluate.py", "--model", "runs/toy-quecc-v4/stage2", "--bench", "gqa",
                                        cwd=layout, check=False))
    assert message.startswith("error: data/eval/gqa/questions.jsonl not found") and "convert_benchmarks.py gqa" in message


def test_a_missing_stage1_names_the_exact_command_to_run(layout):
    message = one_line_error(run_script("02_finetune.py", *TOY, "--tokens", "16", "--compressor", "pool",
                                        cwd=layout, check=False))
    assert message == ("error: no stage-1 projector in runs/toy-pool-v16/stage1; run stage 1 first: "
                       "python 01_pretrain_projector.py --llm toy --tokens 16 --vision toy --compressor pool "
                       "(or --projector DIR; --projector none starts from a fresh projector)")
    message = one_line_error(run_script("02_finetune.py", *TOY, "--output-dir", "elsewhere/mine", cwd=layout,
                                        check=False))
    assert "no stage-1 projector in elsewhere/stage1" in message and message.count("--output-dir elsewhere/stage1") == 1


def test_missing_data_says_where_it_comes_from(tmp_path):
    message = one_line_error(run_script("01_pretrain_projector.py", *TOY, cwd=tmp_path, check=False))
    assert message.startswith("error: data file data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json not found")
    assert "huggingface.co/datasets/liuhaotian/LLaVA-Pretrain" in message
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "llava_v1_5_mix665k.json").write_text("[]")
    message = one_line_error(run_script("02_finetune.py", *TOY, "--image-folder", "data/images", cwd=tmp_path,
                                        check=False))
    assert message.startswith("error: image folder data/images not found") and "LLaVA-Instruct-150K" in message


def test_a_model_that_cannot_be_loaded_is_one_line(layout):
    offline = dict(os.environ, HF_HUB_OFFLINE="1")
    message = one_line_error(run_script("02_finetune.py", "--llm", "no-such-org/no-such-model", "--vision", "toy",
                                        "--projector", "none", cwd=layout, env=offline, check=False))
    assert message.startswith("error: cannot load the LLM no-such-org/no-such-model: ")
    message = one_line_error(run_script("01_pretrain_projector.py", "--llm", "toy", cwd=layout, env=offline,
                                        check=False))
    assert message.startswith("error: cannot load the vision tower openai/clip-vit-large-patch14-336: ")
    message = one_line_error(run_script("03_evaluate.py", "--model", "runs/nothing", "--bench", "toy_reasoning",
                                        cwd=layout, check=False))
    assert message.startswith("error: cannot load the model runs/nothing: no config.json")


def test_the_papers_grid_runs_as_printed(layout, monkeypatch):
    """Every 01, 02 and 03 line of `toy.demo --print-real` parses on the default layout as typed: the data
    found, stage 2 starting from its stage 1, 03 reading stage 2's output; each stage at LLaVA-1.5's
    per-GPU micro-batch (32, 16), which --loss-norm llava averages over."""
    import importlib
    import runpy
    import shlex
    import sys
    import train
    evaluate = importlib.import_module("03_evaluate")
    lines = run_script("-m", "toy.demo", "--print-real").stdout.splitlines()
    monkeypatch.chdir(layout)
    parsed = []
    monkeypatch.setattr(train, "main", lambda stage: parsed.append(train.parse_args(stage)))
    outputs = {}
    for line in (line for line in lines if line.startswith("accelerate launch ")):
        script, *argv = shlex.split(line)[2:]
        monkeypatch.setattr(sys, "argv", [script, *argv])
        if script == "03_evaluate.py":
            args = evaluate.parse_args()
            assert args.model == outputs[args.model] and args.data_root == "data/eval"
            continue
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
        args = parsed.pop()
        assert os.path.exists(args.data) and os.path.isdir(args.image_folder)
        if script == "01_pretrain_projector.py":
            assert args.micro_batch_size == 32 and args.batch_size == 256
            (Path(args.output_dir) / "config.json").write_text("{}")  # as if stage 1 had run
        else:
            assert args.micro_batch_size == 16 and args.batch_size == 256
            assert args.projector == os.path.join(os.path.dirname(args.output_dir), "stage1")
            outputs[args.output_dir] = args.output_dir
    assert len(outputs) == 28
