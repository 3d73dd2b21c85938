"""Guards against results that are wrong without a sign: each of these once exited 0 with a
wrong number, mixed two runs, or crashed where a clear message or a skip belongs."""
import argparse
import importlib
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import constants
import benchmarks
import conversation
import features
import llava_data
import runs
import toy
import train
import vlm
from conftest import ROOT, run_script

evaluate = importlib.import_module("03_evaluate")


def stage1(toy_data, out, *extra, data=None, check=True):
    return run_script("01_pretrain_projector.py", "--llm", "toy", "--vision", "toy", "--tokens", "4",
                      "--data", str(data or toy_data / "pretrain.json"), "--image-folder", str(toy_data / "images"),
                      "--output-dir", str(out), "--max-steps", "2", "--batch-size", "4", "--micro-batch-size", "4",
                      "--num-workers", "0", *extra, check=check)


def refused(result, *words):
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for word in words:
        assert word in result.stderr, (word, result.stderr[-2000:])


# ---------------------------------------------------------------- gradient clipping

def test_clipping_scales_the_gradients_and_logs_the_norm_before():
    weight = torch.nn.Parameter(torch.zeros(2))
    weight.grad = torch.tensor([3.0, 4.0])
    groups = [{"params": [weight]}]
    assert train.clip_gradients(groups, 1.0) == pytest.approx(5.0)
    assert weight.grad.norm().item() == pytest.approx(1.0, rel=1e-5)
    assert train.clip_gradients(groups, 0) == pytest.approx(1.0, rel=1e-5)  # 0: never clipped
    assert weight.grad.norm().item() == pytest.approx(1.0, rel=1e-5)


def test_max_grad_norm_changes_the_trained_weights(toy_data, tmp_path):
    for norm in ("1e-3", "0"):
        stage1(toy_data, tmp_path / norm, "--max-grad-norm", norm)
    clipped, free = (load_file(tmp_path / norm / "projector.safetensors") for norm in ("1e-3", "0"))
    logs = [[json.loads(line) for line in open(tmp_path / norm / "log.jsonl")] for norm in ("1e-3", "0")]
    assert logs[0][0]["grad_norm"] == pytest.approx(logs[1][0]["grad_norm"], rel=1e-5)  # logged before clipping
    assert logs[0][0]["grad_norm"] > 1e-2
    assert any(not torch.equal(clipped[k], free[k]) for k in free)


# ---------------------------------------------------------------- records and samples

def test_image_record_without_image_marker_is_refused_by_id(toy_data, tmp_path):
    records = json.load(open(toy_data / "finetune.json"))[:6]
    index = next(i for i, r in enumerate(records) if "image" in r)
    records[index]["conversations"][0]["value"] = records[index]["conversations"][0]["value"].replace("<image>", "")
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    with pytest.raises(llava_data.BadSample, match=rf"record {index} \(id {records[index]['id']}\): an image but no"):
        llava_data.load_records(path, toy_data / "images")
    kept = llava_data.load_records(path, toy_data / "images", skip_bad=True, log=lambda *a: None)
    assert len(kept) == 5 and records[index] not in kept


def test_json_object_where_a_list_belongs_is_named(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"data": [{"id": 1}]}, indent=2))
    with pytest.raises(llava_data.BadSample, match="a JSON object .*where a list of records belongs"):
        list(llava_data.iter_records(path))
    path.write_text(json.dumps({"id": 1, "conversations": []}) + "\n")  # JSON Lines of one record is fine
    assert [record for record, _ in llava_data.iter_records(path)] == [{"id": 1, "conversations": []}]


def test_a_sample_whose_answers_max_length_cuts_is_refused(tokenizer):
    turns = [{"from": "human", "value": "What is written in the image? " * 5},
             {"from": "gpt", "value": "cat"}]
    assert conversation.tokenize(tokenizer, turns, 4, 200)["labels"].count(constants.IGNORE) < 200
    with pytest.raises(ValueError, match="--max-length 20 cuts every answer token"):
        conversation.tokenize(tokenizer, turns, 4, 20)


def truncated_png(toy_data, tmp_path):
    """A copy of the toy images in which one PNG keeps its header but loses its pixels: it
    passes the header check and fails to decode."""
    images = tmp_path / "images"
    shutil.copytree(toy_data / "images", images)
    records = [r for r in json.load(open(toy_data / "finetune.json")) if "image" in r][:8]
    victim = images / records[2]["image"]
    victim.write_bytes(victim.read_bytes()[:100])
    return images, records


@pytest.mark.parametrize("extra", [[], ["--standardize-features"], ["--feature-cache", "CACHE"]])
def test_skip_bad_samples_skips_an_image_that_fails_to_decode(toy_data, tmp_path, extra):
    images, records = truncated_png(toy_data, tmp_path)
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    extra = [str(tmp_path / "cache") if e == "CACHE" else e for e in extra]
    args = ["01_pretrain_projector.py", "--llm", "toy", "--vision", "toy", "--data", str(path), "--image-folder",
            str(images), "--max-steps", "2", "--batch-size", "4", "--micro-batch-size", "1", "--num-workers", "0",
            "--save-every", "1", *extra]
    refused(run_script(*args, "--output-dir", str(tmp_path / "a"), check=False),
            f"(id {records[2]['id']})", "--skip-bad-samples")
    result = run_script(*args, "--output-dir", str(tmp_path / "b"), "--skip-bad-samples")
    assert f"(id {records[2]['id']})" in result.stdout
    assert len(open(tmp_path / "b" / "log.jsonl").readlines()) == 2
    if not extra:  # the image is met in training (step 2), not before: resumed, the run goes on past it
        resumed = run_script(*args, "--output-dir", str(tmp_path / "a"), "--resume", "--skip-bad-samples")
        assert "at step 1" in resumed.stdout and len(open(tmp_path / "a" / "log.jsonl").readlines()) == 2


def test_a_record_that_max_length_refuses_stops_the_run_before_training(toy_data, tmp_path):
    """Every record rendered and tokenized as training will, before training: not met, and stopped
    at, mid-run (the template's refusals: tests/test_conversation.py)."""
    records = json.load(open(toy_data / "pretrain.json"))[:8]
    records[5]["conversations"][0]["value"] += " Describe the image briefly." * 30
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    result = stage1(toy_data, tmp_path / "out", "--max-length", "64", data=path, check=False)
    refused(result, f"record 5 (id {records[5]['id']}): --max-length 64 cuts every answer token", "--skip-bad-samples")
    assert not (tmp_path / "out" / "log.jsonl").exists()


def test_stage1_trains_on_text_only_micro_batches(toy_data, tmp_path):
    records = json.load(open(toy_data / "finetune.json"))
    mixed = [r for r in records if "image" not in r][:2] + [r for r in records if "image" in r][:2]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(mixed))
    stage1(toy_data, tmp_path / "out", "--micro-batch-size", "1", data=path)
    assert len(open(tmp_path / "out" / "log.jsonl").readlines()) == 2


def test_a_corrupt_feature_cache_file_is_named_and_computed_again(toy_data, tmp_path, capsys):
    model, _, processor = vlm.build("toy-xs", "toy", 4, "quecc")
    cache = features.FeatureCache(tmp_path, model, processor)
    images = [str(toy_data / "images" / r["image"]) for r in json.load(open(toy_data / "pretrain.json"))[:2]]
    assert cache.prepare(images) == (2, {})
    good = cache.load(images[0])
    corrupt = cache.file(images[0])
    with open(corrupt, "r+b") as f:
        f.truncate(100)
    assert cache.prepare(images) == (1, {})
    assert f"{corrupt} is corrupt" in capsys.readouterr().out
    assert all(torch.equal(a, b) for a, b in zip(cache.load(images[0]), good))


def test_the_cache_key_follows_the_tower_not_where_it_was_loaded_from(tmp_path):
    """A tower copied to another folder, and the tower of a saved model folder, read the features
    their first run wrote; other weights or preprocessing get a key of their own."""
    model, tokenizer, processor = vlm.build("toy-xs", "toy", 4, "quecc")
    key = features.encoder_key(model.vision, processor)
    model.vision.save_pretrained(tmp_path / "tower")
    processor.save_pretrained(tmp_path / "tower")
    moved = vlm.build("toy-xs", str(tmp_path / "tower"), 4, "quecc")
    vlm.save(model, tokenizer, tmp_path / "model", save_llm=True, extra_config=dict(stage=2))
    saved = vlm.load_pretrained(tmp_path / "model")
    assert moved[0].vision.config._name_or_path != model.vision.config._name_or_path
    assert features.encoder_key(moved[0].vision, moved[2]) == key == features.encoder_key(saved[0].vision, saved[2])
    processor.crop_size = {"height": 48, "width": 48}
    assert features.encoder_key(model.vision, processor) != key
    with torch.no_grad():
        next(model.vision.parameters()).add_(1)
    assert features.encoder_key(model.vision, toy.build_image_processor()) != key


def test_an_undecodable_image_is_reported_under_every_path_that_holds_it(toy_data, tmp_path):
    """The cache encodes an image once whatever its paths; a failure names each of them, so the
    records of a copy under another name are refused too."""
    images, records = truncated_png(toy_data, tmp_path)
    victim = images / records[2]["image"]
    shutil.copy(victim, images / "copy.png")
    model, _, processor = vlm.build("toy-xs", "toy", 4, "quecc")
    cache = features.FeatureCache(tmp_path / "cache", model, processor)
    good = str(images / records[0]["image"])
    encoded, failed = cache.prepare([good, str(victim), str(images / "copy.png")])
    assert encoded == 1 and set(failed) == {str(victim), str(images / "copy.png")}


# ---------------------------------------------------------------- runs and output directories

def test_an_output_directory_holding_a_run_is_refused_without_resume_or_overwrite(toy_data, tmp_path):
    stage1(toy_data, tmp_path)
    refused(stage1(toy_data, tmp_path, check=False), str(tmp_path), "--resume", "--overwrite")
    stage1(toy_data, tmp_path, "--overwrite", "--max-steps", "3")
    assert len(open(tmp_path / "log.jsonl").readlines()) == 3


def test_resume_refuses_changed_settings_and_data_and_allows_the_others(toy_data, tmp_path):
    data, out = tmp_path / "data.json", tmp_path / "out"
    shutil.copy(toy_data / "pretrain.json", data)
    stage1(toy_data, out, "--max-steps", "3", "--save-every", "1", data=data)
    state = json.load(open(runs.checkpoint_dirs(out)[-1] + "/trainer_state.json"))
    assert state["step"] == 2 and state["settings"]["lr"] == 1e-3
    refused(stage1(toy_data, out, "--max-steps", "3", "--resume", "--lr", "2e-3", data=data, check=False),
            "--lr 0.001 -> 0.002")
    refused(stage1(toy_data, out, "--max-steps", "3", "--resume", "--batch-size", "2",
                   "--micro-batch-size", "2", data=data, check=False), "--batch-size 4 -> 2")
    (out / vlm.CONFIG_FILE).unlink()  # as if killed after its last checkpoint
    records = json.load(open(data))
    records[0]["conversations"][-1]["value"] = "another caption"
    data.write_text(json.dumps(records))  # the same path and record count, other contents
    refused(stage1(toy_data, out, "--max-steps", "3", "--resume", data=data, check=False),
            f"the records taken from {data} are not those it began with")
    shutil.copy(toy_data / "pretrain.json", data)
    resumed = stage1(toy_data, out, "--max-steps", "3", "--resume", "--skip-bad-samples", data=data)
    assert "at step 2" in resumed.stdout and len(open(out / "log.jsonl").readlines()) == 3
    done = stage1(toy_data, out, "--max-steps", "3", "--resume", "--save-every", "2", "--num-workers", "1",
                  "--packing", data=data)
    assert "finished; nothing to do" in done.stdout


def test_under_loss_norm_llava_the_batch_split_defines_the_run(tmp_path):
    """Each micro-batch's mean, averaged: another micro-batch size or process count trains
    another model, so a resume may not change them; under the tokens norm it may."""
    def resume(loss_norm, micro_batch_size, world):
        args = argparse.Namespace(output_dir=str(tmp_path), resume=True, overwrite=False, lr=1e-3,
                                  loss_norm=loss_norm, micro_batch_size=micro_batch_size)
        return runs.prepare_output_dir(args, 0, world)

    checkpoint = tmp_path / "checkpoints" / "step-0000004"
    checkpoint.mkdir(parents=True)
    for loss_norm in ("llava", "tokens"):  # began with micro-batches of 2 in one process
        began = argparse.Namespace(loss_norm=loss_norm, micro_batch_size=2, lr=1e-3)
        (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 4, "settings": runs.run_settings(began, 1)}))
        for micro_batch_size, world, change in [(4, 1, "--micro-batch-size 2 -> 4"), (2, 2, "processes 1 -> 2")]:
            if loss_norm == "tokens":
                assert resume(loss_norm, micro_batch_size, world) is False
                continue
            with pytest.raises(SystemExit, match="under --loss-norm llava how each global batch is split") as refusal:
                resume(loss_norm, micro_batch_size, world)
            assert change in str(refusal.value)


def test_a_second_run_into_a_locked_directory_is_refused(toy_data, tmp_path, checkpoint):
    locker = subprocess.Popen([sys.executable, "-c", "import sys, time, guard; guard.lock_directory(sys.argv[1]); "
                               "print('locked', flush=True); time.sleep(60)", str(tmp_path)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout.readline().strip() == "locked"
        refused(stage1(toy_data, tmp_path, check=False), f"{tmp_path} is in use by another run")
        refused(run_script("03_evaluate.py", "--model", str(checkpoint), "--bench", "toy_ocr", "--data-root",
                           str(toy_data / "eval"), "--output-dir", str(tmp_path), check=False),
                f"{tmp_path} is in use by another run")
    finally:
        locker.kill()
    stage1(toy_data, tmp_path)  # the lock went with the process


def test_a_kill_during_the_final_save_leaves_no_output_that_looks_complete(tmp_path, monkeypatch):
    model, tokenizer, _ = vlm.build("toy-xs", "toy", 4, "quecc")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tokenizer, "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        vlm.save(model, tokenizer, tmp_path, save_llm=True)
    assert not (tmp_path / "model.safetensors").exists() and not (tmp_path / vlm.CONFIG_FILE).exists()
    monkeypatch.undo()
    vlm.save(model, tokenizer, tmp_path, save_llm=True)  # a rerun completes it
    assert (tmp_path / vlm.CONFIG_FILE).exists() and not (tmp_path / ".saving").exists()
    assert vlm.load_pretrained(tmp_path)[0].config.tokens == 4


def test_a_projector_for_another_llm_or_tower_is_refused(tmp_path):
    model, tokenizer, _ = vlm.build("toy-s", "toy", 4, "quecc")
    vlm.save(model, tokenizer, tmp_path, save_llm=False)
    other, _, _ = vlm.build("toy-s", "toy", 4, "quecc")
    other.config.llm = "Qwen/Qwen1.5-0.5B-Chat"
    with pytest.raises(ValueError, match="trained for --llm toy-s, this run has --llm Qwen/Qwen1.5-0.5B-Chat"):
        vlm.load_projector(other, tmp_path)
    other.config.update(dict(llm=model.config.llm, vision="/models/clip-vit-base-patch16"))
    with pytest.raises(ValueError, match="--vision toy"):
        vlm.load_projector(other, tmp_path)
    other.config.update(dict(llm="/downloads/toy-s", vision=model.config.vision))  # the same model, downloaded: accepted
    vlm.load_projector(other, tmp_path)
    model.config.llm = "/runs/a/stage2/llm"  # the LLM of a stage-2 output of the earlier layout
    vlm.save(model, tokenizer, tmp_path, save_llm=False)
    other.config.llm = "/runs/b/stage2/llm"  # another run's finetuned LLM, also named llm
    with pytest.raises(ValueError, match="trained for --llm /runs/a/stage2/llm, this run has --llm /runs/b/stage2/llm"):
        vlm.load_projector(other, tmp_path)
    other.config.llm = "/runs/a/stage2/../stage2/llm"
    vlm.load_projector(other, tmp_path)


@pytest.mark.parametrize("flag, value, words", [
    ("--micro-batch-size", "0", "--micro-batch-size must be positive"),
    ("--lr", "-0.001", "--lr must be positive"),
    ("--warmup-ratio", "1.5", "--warmup-ratio must lie in [0, 1]"),
    ("--max-steps", "-1", "--max-steps must be >= 0"),
    ("--max-grad-norm", "-1", "--max-grad-norm must be >= 0"),
    ("--eval-every", "5", "--eval-every N and --eval-bench NAMES go together"),
    ("--eval-limit", "-1", "--eval-limit must be >= 0"),
])
def test_bad_values_are_refused_in_one_line(flag, value, words, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", ["01", "--data", "d.json", "--output-dir", str(tmp_path), flag, value])
    with pytest.raises(SystemExit):
        train.parse_args(dict(description="", lr=1e-3, batch_size=8, train_llm=False, output="stage1",
                              data="d.json", image_folder=".", source=""))
    assert words in capsys.readouterr().err


def stage2_args(monkeypatch, toy_data, *argv):
    monkeypatch.setattr(sys, "argv", ["02", "--data", str(toy_data / "finetune.json"),
                                      "--image-folder", str(toy_data / "images"), *map(str, argv)])
    return train.parse_args(dict(description="", lr=2e-5, batch_size=8, train_llm=True, output="stage2",
                                 data="d.json", image_folder=".", source=""))


def test_an_output_dir_that_is_or_holds_an_input_and_a_missing_projector_are_refused(toy_data, tmp_path,
                                                                                       monkeypatch, capsys):
    stage1_dir = tmp_path / "stage1"
    model, tokenizer, _ = vlm.build("toy-xs", "toy", 4, "quecc")
    vlm.save(model, tokenizer, stage1_dir, save_llm=False)
    for output, words in [(stage1_dir, f"--output-dir {stage1_dir} is the --projector {stage1_dir}"),
                          (toy_data, f"--output-dir {toy_data} holds the --data {toy_data / 'finetune.json'}")]:
        with pytest.raises(SystemExit):  # --overwrite would have deleted the stage-1 projector
            stage2_args(monkeypatch, toy_data, "--projector", stage1_dir, "--output-dir", output, "--overwrite")
        assert words in capsys.readouterr().err
    assert (stage1_dir / vlm.PROJECTOR_FILE).exists()
    args = stage2_args(monkeypatch, toy_data, "--projector", stage1_dir, "--output-dir", tmp_path / "stage2")
    assert args.projector == str(stage1_dir)
    with pytest.raises(SystemExit, match=f"--projector {tmp_path} holds no stage-1 output"):
        stage2_args(monkeypatch, toy_data, "--projector", tmp_path, "--output-dir", tmp_path / "stage2")


def test_a_projector_of_other_tokens_is_refused_in_one_line(toy_data, tmp_path):
    model, tokenizer, _ = vlm.build("toy", "toy", 4, "quecc")
    vlm.save(model, tokenizer, tmp_path / "stage1", save_llm=False)
    result = run_script("02_finetune.py", "--llm", "toy", "--vision", "toy", "--tokens", "16", "--projector",
                        str(tmp_path / "stage1"), "--data", str(toy_data / "finetune.json"), "--image-folder",
                        str(toy_data / "images"), "--output-dir", str(tmp_path / "stage2"), check=False)
    refused(result, f"error: {tmp_path / 'stage1'}: projector was trained with tokens=4, this run has tokens=16")


def test_an_output_dir_that_is_a_file_or_not_writable_and_bad_tokens_are_refused(toy_data, tmp_path):
    (tmp_path / "file").write_text("")
    refused(stage1(toy_data, tmp_path / "file", check=False), "is a file")
    refused(stage1(toy_data, tmp_path / "file" / "out", check=False), "is not writable (Not a directory)")
    result = stage1(toy_data, tmp_path / "t", "--tokens", "5", check=False)
    refused(result, "valid values: 1, 4, 9, 16, 36, 64, 144, 576")
    assert "trainable parameters" not in result.stdout  # refused before the models were built


# ---------------------------------------------------------------- evaluation

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    model, tokenizer, _ = vlm.build("toy-xs", "toy", 4, "quecc")
    vlm.save(model, tokenizer, out, save_llm=True)
    return out


def evaluate_args(model, toy_data, out, *extra):
    return ["03_evaluate.py", "--model", str(model), "--bench", "toy_ocr", "--data-root", str(toy_data / "eval"),
            "--output-dir", str(out), "--max-new-tokens", "2", "--batch-size", "8", *extra]


def test_answers_of_another_model_or_setting_are_refused_or_overwritten(toy_data, tmp_path, checkpoint):
    run_script(*evaluate_args(checkpoint, toy_data, tmp_path))
    other = tmp_path / "other"
    shutil.copytree(checkpoint, other)
    model, tokenizer, _ = vlm.load_pretrained(other)
    with torch.no_grad():
        model.projector.to_llm[-1].weight.add_(1.0)
    vlm.save(model, tokenizer, other, save_llm=True)
    refused(run_script(*evaluate_args(other, toy_data, tmp_path), check=False), "fingerprint", "--overwrite")
    refused(run_script(*evaluate_args(checkpoint, toy_data, tmp_path, "--max-new-tokens", "3"), check=False),
            "max_new_tokens 2, this run 3")
    run_script(*evaluate_args(other, toy_data, tmp_path, "--overwrite"))
    identity = evaluate.answer_identity(argparse.Namespace(model=str(other), max_new_tokens=2, batch_size=8, feature_cache=None), world=1)
    identity["questions"] = runs.questions_fingerprint(
        "toy_ocr", benchmarks.load_questions(toy_data / "eval" / "toy_ocr" / "questions.jsonl"))
    rows = [json.loads(line) for line in open(tmp_path / "toy_ocr" / "answers.jsonl")]
    assert {json.dumps(r["metadata"]) for r in rows} == {json.dumps(identity)}
    assert json.loads(open(tmp_path / "results.jsonl").readline())["identity"] == dict(identity, params_b=None)


def test_what_a_question_shows_the_model_makes_its_answers_identity(toy_data):
    questions = benchmarks.load_questions(toy_data / "eval" / "toy_reasoning" / "questions.jsonl")
    fingerprint = runs.questions_fingerprint("toy_reasoning", questions)
    corrected = [dict(q, answers=["blue"]) if i == 3 else q for i, q in enumerate(questions)]
    assert runs.questions_fingerprint("toy_reasoning", corrected) == fingerprint  # scoring changes, not answers
    for key, value in (("question", "Is it blue?"), ("image", "other.png"), ("question_id", "new")):
        changed = [dict(q, **{key: value}) if i == 3 else q for i, q in enumerate(questions)]
        assert runs.questions_fingerprint("toy_reasoning", changed) != fingerprint, key
    assert runs.questions_fingerprint("toy_reasoning", questions[1:]) != fingerprint


def test_answers_to_changed_questions_are_refused_or_answered_again(toy_data, tmp_path, checkpoint):
    """03 once reused every answer after the question file changed and scored them against the new questions."""
    folder = tmp_path / "data" / "eval" / "toy_ocr"
    folder.mkdir(parents=True)
    (folder / "images").symlink_to(toy_data / "images")
    questions = (toy_data / "eval" / "toy_ocr" / "questions.jsonl").read_text().splitlines()
    (folder / "questions.jsonl").write_text("\n".join(questions) + "\n")
    run_script(*evaluate_args(checkpoint, tmp_path / "data", tmp_path / "out"))
    changed = json.loads(questions[2]) | {"question": "Which word is written here?"}
    questions[2] = json.dumps(changed)
    (folder / "questions.jsonl").write_text("\n".join(questions) + "\n")
    answers = tmp_path / "out" / "toy_ocr" / "answers.jsonl"
    refused(run_script(*evaluate_args(checkpoint, tmp_path / "data", tmp_path / "out"), check=False),
            f"{answers} was written for another model, setting or question file (questions '", "--overwrite")
    run_script(*evaluate_args(checkpoint, tmp_path / "data", tmp_path / "out", "--overwrite"))
    prompts = {row["question_id"]: row["prompt"] for row in map(json.loads, open(answers))}
    assert prompts[changed["question_id"]] == benchmarks.build_prompt("toy_ocr", changed)


def test_evaluation_refuses_bad_values_in_one_line(toy_data, tmp_path, checkpoint):
    refused(run_script(*evaluate_args(checkpoint, toy_data, tmp_path, "--batch-size", "0"), check=False),
            "--batch-size must be positive")
    refused(run_script("generate.py", "--model", str(checkpoint), "--image", str(tmp_path), "--question", "What?",
                       check=False), f"{tmp_path} is a directory")
    part = tmp_path / "toy_ocr" / "answers.part-0.jsonl"
    part.parent.mkdir()
    part.write_text(json.dumps({"text": "cat"}) + "\n")
    refused(run_script(*evaluate_args(checkpoint, toy_data, tmp_path), check=False),
            f"{part}:1: question_id missing")


def test_pope_scoring_refuses_questions_that_are_not_popes(toy_data):
    questions = benchmarks.load_questions(toy_data / "eval" / "toy_reasoning" / "questions.jsonl")
    answers = [{"question_id": q["question_id"], "text": "yes"} for q in questions]
    with pytest.raises(ValueError, match="not POPE questions"):
        benchmarks.score("pope", questions, answers)


# ---------------------------------------------------------------- the fit

def scores_csv(path, cells, bom=False):
    rng = np.random.default_rng(0)
    N, V = rng.uniform(0.3, 10, cells), rng.integers(1, 600, cells)
    accuracy = 1 - (0.4 * N ** -0.08 * V ** -0.02 + 0.03 + rng.normal(0, 0.005, cells))
    lines = ["params_b,tokens,benchmark,score"] + [f"{n:.6f},{v},x,{a:.6f}" for n, v, a in zip(N, V, accuracy)]
    path.write_text("\ufeff" * bom + "\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_a_csv_with_a_byte_order_mark_reads_like_one_without(tmp_path):
    for bom in (False, True):
        run_script("04_fit_scaling.py", "--scores", str(scores_csv(tmp_path / f"{bom}.csv", 40, bom)),
                   "--output-dir", str(tmp_path / str(bom)), "--bootstrap", "0", "--no-plots")
    assert json.load(open(tmp_path / "True" / "fit.json"))["alpha"] == json.load(open(tmp_path / "False" / "fit.json"))["alpha"]


def test_the_fit_of_many_cells_stays_in_bounded_memory(tmp_path):
    """20,000 distinct (N, V) cells: 3.2 GB before the sums were taken in chunks, ~0.2 GB now."""
    path = scores_csv(tmp_path / "many.csv", 20000)
    peak = run_script("-c", "import resource, subprocess, sys; subprocess.run([sys.executable, '04_fit_scaling.py', "
                      f"'--scores', {str(path)!r}, '--output-dir', {str(tmp_path)!r}, '--bootstrap', '0', '--no-plots'], "
                      "check=True, capture_output=True); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    assert int(peak.stdout) < 600_000, f"peak {int(peak.stdout) / 1e6:.2f} GB"  # ru_maxrss is in KB
    assert (tmp_path / "fit.json").exists()
