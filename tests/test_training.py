"""Model assembly and the two stages, run as a user runs them."""
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

import conversation
import llava_data
import toy
import vlm
from conftest import ROOT, run_script


@pytest.fixture(scope="module")
def toy_dirs(tmp_path_factory):
    """Toy LLM+tokenizer and vision tower saved like hub checkpoints."""
    return toy.save_toy_models(tmp_path_factory.mktemp("models"))


def read_log(directory):
    return [json.loads(line) for line in open(f"{directory}/log.jsonl")]


def test_directory_path_loads_the_same_model_as_the_preset(toy_dirs):
    llm_dir, vision_dir = toy_dirs
    from_dirs, tok_a, _ = vlm.build(llm_dir, vision_dir, 4, "quecc")
    preset, tok_b, _ = vlm.build("toy", "toy", 4, "quecc")
    assert tok_a("What colour?")["input_ids"] == tok_b("What colour?")["input_ids"]
    assert tok_a.chat_template == tok_b.chat_template
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.allclose(from_dirs.llm(ids).logits, preset.llm(ids).logits, atol=1e-6)
    pixels = torch.randn(1, 3, 96, 96)
    assert torch.allclose(from_dirs.encode_images(pixels)[1], preset.encode_images(pixels)[1], atol=1e-5)
    assert from_dirs.config.key_layers == [3, 4, 6, 6] and from_dirs.config.grid == 24


def test_a_model_given_by_a_relative_path_is_stored_as_it_loads_from_anywhere(toy_dirs, monkeypatch):
    llm_dir, vision_dir = toy_dirs
    monkeypatch.chdir(os.path.dirname(llm_dir))
    model, _, _ = vlm.build("llm", "vision", 4, "quecc")
    assert (model.config.llm, model.config.vision) == (llm_dir, vision_dir)  # config.json's names
    monkeypatch.chdir(ROOT)
    assert vlm.loadable("toy") == "toy"  # a preset, though the repository holds a toy/ folder


def test_mixed_batch_equals_samples_one_by_one(toy_data, tokenizer):
    """Text-only and image samples in one batch: the summed loss equals the sum over samples
    run alone, so visual tokens land in the right rows and padding changes nothing."""
    torch.manual_seed(0)
    model, tokenizer, processor = vlm.build("toy", "toy", 4, "quecc")
    model.eval()
    records = json.load(open(toy_data / "finetune.json"))
    records = [r for r in records if "image" not in r][:1] + [r for r in records if "image" in r][:2]
    dataset = conversation.SupervisedDataset(records, "f", toy_data / "images", tokenizer, processor, 4, 512)
    samples = [dataset[i] for i in range(3)]
    assert samples[0]["pixel_values"] is None
    with torch.no_grad():
        together, n = model(**conversation.collate(samples, tokenizer.pad_token_id))
        alone = [model(**conversation.collate([s], tokenizer.pad_token_id)) for s in samples]
    assert n == sum(a[1] for a in alone)
    assert torch.allclose(together, sum(a[0] for a in alone), rtol=1e-5)


def test_stage1_then_stage2_loss_falls(toy_data, toy_dirs, tmp_path):
    llm_dir, vision_dir = toy_dirs
    common = ["--llm", llm_dir, "--vision", vision_dir, "--tokens", "4", "--image-folder",
              str(toy_data / "images"), "--num-workers", "0"]
    run_script("01_pretrain_projector.py", *common, "--data", str(toy_data / "pretrain.json"),
               "--output-dir", str(tmp_path / "s1"), "--max-steps", "10", "--batch-size", "16",
               "--standardize-features")
    s1 = tmp_path / "s1"
    config = vlm.read_config(s1)
    assert config.tokens == 4 and config.compressor == "quecc" and config.key_layers == [3, 4, 6, 6]
    # QueCC keeps the human turn in stage 1 (it needs the question); images cropped as LLaVA's pretrain.sh
    assert config.conv_template == "chat" and config.image_aspect == "crop" and config.loss_norm == "tokens"
    assert (s1 / "projector.safetensors").exists() and not (s1 / "llm").exists()
    # --standardize-features: the projector holds each channel's mean and std over the training
    # images (all 160 caption images here, under the 256 it reads), computed here directly
    model, _, processor = vlm.build(llm_dir, vision_dir, 4, "quecc")
    images = [r["image"] for r in json.load(open(toy_data / "pretrain.json"))]
    patches, multi_level = model.encode_images(torch.stack(
        [conversation.load_image(str(toy_data / "images" / image), processor) for image in images]))
    stats = load_file(s1 / "projector.safetensors")
    for name, features in (("standardize_patches", patches), ("standardize_multi_level", multi_level)):
        assert torch.allclose(stats[f"{name}.mean"], features.mean((0, 1)), atol=1e-4)
        assert torch.allclose(stats[f"{name}.std"], features.std((0, 1), correction=0), rtol=1e-3)

    run_script("02_finetune.py", *common, "--projector", str(s1), "--data", str(toy_data / "finetune.json"),
               "--output-dir", str(tmp_path / "s2"), "--max-steps", "50", "--batch-size", "8", "--lr", "2e-3")
    log = read_log(tmp_path / "s2")
    assert len(log) == 50 and {"step", "loss", "lr", "tokens_per_s"} <= set(log[0])
    first, last = sum(e["loss"] for e in log[:5]) / 5, sum(e["loss"] for e in log[-5:]) / 5
    assert last < 0.7 * first, (first, last)

    # the output directory loads for inference and reproduces the trained projector
    model, _, _ = vlm.load_pretrained(tmp_path / "s2")
    assert (tmp_path / "s2" / "model.safetensors").exists()
    assert model.config.stage == 2 and model.config.image_aspect == "pad" and model.config.steps == 50
    assert torch.equal(model.projector.standardize_patches.mean, stats["standardize_patches.mean"])


def test_projector_from_another_configuration_is_refused(toy_data, tmp_path):
    model, tokenizer, _ = vlm.build("toy", "toy", 4, "quecc")
    vlm.save(model, tokenizer, tmp_path, save_llm=False)
    other, _, _ = vlm.build("toy", "toy", 16, "quecc")
    with pytest.raises(ValueError, match="tokens=4, this run has tokens=16"):
        vlm.load_projector(other, tmp_path)


def test_bad_input_stops_before_training_with_its_name(toy_data, tmp_path):
    records = json.load(open(toy_data / "finetune.json"))[:20]
    records[7] = dict(records[7], image="nowhere.png")
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records))
    args = ["02_finetune.py", "--llm", "toy", "--vision", "toy", "--data", str(path), "--image-folder",
            str(toy_data / "images"), "--output-dir", str(tmp_path / "out"), "--max-steps", "1",
            "--batch-size", "4", "--micro-batch-size", "4", "--num-workers", "0", "--projector", "none"]
    result = run_script(*args, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"{path}: record 7 (id {records[7]['id']}): image not found" in result.stderr
    result = run_script(*args, "--skip-bad-samples")
    assert "skipped 1 bad samples of 20" in result.stdout


def test_standardizing_features_of_text_only_data_is_refused_by_name(toy_data, tmp_path):
    path = tmp_path / "text.json"
    path.write_text(json.dumps([r for r in json.load(open(toy_data / "finetune.json")) if "image" not in r]))
    result = run_script("01_pretrain_projector.py", "--llm", "toy", "--vision", "toy", "--data", str(path),
                        "--image-folder", str(tmp_path), "--output-dir", str(tmp_path / "out"), "--max-steps", "1", "--batch-size", "2", "--micro-batch-size", "2",
                        "--num-workers", "0", "--standardize-features", check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"{path}: no sample with an image, nothing for --standardize-features to measure" in result.stderr


def test_unsupported_token_count_is_refused_by_the_script(toy_data, tmp_path):
    result = run_script("01_pretrain_projector.py", "--llm", "toy", "--vision", "toy", "--tokens", "5",
                        "--data", str(toy_data / "pretrain.json"), "--image-folder", str(toy_data / "images"),
                        "--output-dir", str(tmp_path), check=False)
    assert result.returncode != 0 and "valid values: 1, 4, 9, 16, 36, 64, 144, 576" in result.stderr


def test_mfu_flops_estimate_agrees_with_torchs_flop_counter():
    """The MFU numerator (6N or 4N + attention per token) against the FLOPs torch counts in a real
    forward and backward, with and without the LLM's weight gradients. The estimate ignores norms and
    softmax and counts the tied embedding once: within 35% on this 4-layer toy (19% and 28% measured)."""
    import train
    from torch.utils.flop_counter import FlopCounterMode
    tokenizer = toy.build_tokenizer()
    llm = toy.build_llm("toy", len(tokenizer))
    length = 100
    ids = torch.randint(0, len(tokenizer), (2, length))
    for llm_trains in (True, False):
        llm.requires_grad_(llm_trains)
        embeddings = llm.get_input_embeddings()(ids).detach().requires_grad_(True)  # the projector's side
        with FlopCounterMode(display=False) as counter:
            llm(inputs_embeds=embeddings).logits.float().square().mean().backward()
        measured = counter.get_total_flops() / ids.numel()
        assert 1.0 <= train.training_flops_per_token(llm, llm_trains, length) / measured < 1.35, llm_trains


def test_loss_norm_llava_is_the_mean_of_micro_batch_means(toy_data, tmp_path):
    """--loss-norm llava: step 1's loss and gradient norm equal those of the mean over micro-batches
    of each micro-batch's mean token loss, computed here by hand on the same batches."""
    import train
    run_script("01_pretrain_projector.py", "--llm", "toy", "--vision", "toy", "--data", str(toy_data / "pretrain.json"),
               "--image-folder", str(toy_data / "images"), "--output-dir", str(tmp_path), "--max-steps", "1",
               "--batch-size", "8", "--micro-batch-size", "2", "--num-workers", "0", "--loss-norm", "llava")
    logged = read_log(tmp_path)[0]
    assert vlm.read_config(tmp_path).loss_norm == "llava"
    torch.manual_seed(42)  # train.py's default --seed, set before the model is built
    model, tokenizer, processor = vlm.build("toy", "toy", 4, "quecc")
    records = llava_data.load_records(toy_data / "pretrain.json", toy_data / "images")
    dataset = conversation.SupervisedDataset(records, "p", toy_data / "images", tokenizer, processor, 4, 2048,
                                             template="chat", aspect="crop")
    batch = train.global_batches(len(records), 8, 42, 1)[0]
    sums, counts = zip(*(model(**conversation.collate([dataset[i] for i in micro], tokenizer.pad_token_id))
                         for micro in train.micro_batches([batch], 0, 1, 2)))
    assert len(set(int(c) for c in counts)) > 1  # micro-batches of different label counts: the two norms differ
    llava = sum(s / c for s, c in zip(sums, counts)) / len(sums)
    llava.backward()
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.projector.parameters() if p.grad is not None])
    assert logged["loss"] == pytest.approx(llava.item(), rel=1e-5)
    assert logged["grad_norm"] == pytest.approx(grad_norm.item(), rel=1e-4)
    tokens = sum(sums) / sum(counts)  # --loss-norm tokens, the default
    assert abs(tokens.item() - llava.item()) > 1e-3 * llava.item()


def test_show_samples_renders_what_the_model_sees(toy_data, tmp_path):
    common = ["--llm", "toy", "--vision", "toy", "--image-folder", str(toy_data / "images"),
              "--output-dir", str(tmp_path / "out"), "--show-samples", "2"]
    # stage 1 of a text-free compressor: LLaVA's plain template, no question
    lines = run_script("01_pretrain_projector.py", *common, "--compressor", "tokenpacker",
                       "--data", str(toy_data / "pretrain.json")).stdout.splitlines()
    records = json.load(open(toy_data / "pretrain.json"))
    shown = [json.loads(line) for line in lines]
    assert [s["id"] for s in shown] == [r["id"] for r in records[:2]]
    caption = records[0]["conversations"][1]["value"]
    assert shown[0] == {"id": records[0]["id"], "text": f"<image>{caption}\n", "targets": [caption + "\n"],
                        "query": None}
    # stage 2, QueCC: the chat template, one target per answer, the question as QueCC reads it
    record = json.load(open(toy_data / "finetune.json"))[0]
    lines = run_script("02_finetune.py", *common, "--data", str(toy_data / "finetune.json")).stdout.splitlines()
    shown = json.loads(lines[0])
    answers = [t["value"] for t in record["conversations"] if t["from"] == "gpt"]
    assert shown["targets"] == [a + "<|im_end|>" for a in answers]
    assert shown["text"].startswith("<|im_start|>user\n<image>\n") and shown["text"].count("<image>") == 1
    assert shown["query"] == record["conversations"][0]["value"].replace("<image>", "").strip()
    assert not (tmp_path / "out").exists()  # nothing trained


def test_a_tokenizer_without_chat_template_trains_with_vicuna_v1(toy_data, tmp_path):
    """Vicuna-1.5's tokenizer has no chat template: LLaVA's vicuna_v1 is used, not refused."""
    llm_dir, vision_dir = toy.save_toy_models(tmp_path / "models")
    (tmp_path / "models" / "llm" / "chat_template.jinja").unlink(missing_ok=True)
    config_file = tmp_path / "models" / "llm" / "tokenizer_config.json"
    config_file.write_text(json.dumps({k: v for k, v in json.loads(config_file.read_text()).items() if k != "chat_template"}))
    assert vlm.load_tokenizer(llm_dir).chat_template is None
    common = ["--llm", llm_dir, "--vision", vision_dir, "--data", str(toy_data / "finetune.json"), "--image-folder",
              str(toy_data / "images"), "--output-dir", str(tmp_path / "out"), "--num-workers", "0"]
    shown = json.loads(run_script("02_finetune.py", *common, "--show-samples", "1").stdout.splitlines()[0])
    assert shown["text"].startswith(conversation.VICUNA_SYSTEM + " USER: <image>\n")
    assert all(t.startswith(" ") and t.endswith("<|im_end|>") for t in shown["targets"])  # answer and EOS
    run_script("02_finetune.py", *common, "--max-steps", "2", "--batch-size", "4", "--micro-batch-size", "4",
               "--projector", "none")
    assert vlm.read_config(tmp_path / "out").conv_template == "vicuna_v1"
    assert all(math.isfinite(entry["loss"]) for entry in read_log(tmp_path / "out"))
