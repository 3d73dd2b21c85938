"""Model assembly and the two stages, run as a user runs them."""
import json

import pytest
import torch
from safetensors.torch import load_file

import conversation
import toy
import vlm
from conftest import run_script


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
    assert from_dirs.config["key_layers"] == [3, 4, 6, 6] and from_dirs.config["grid"] == 24


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
    config = json.load(open(s1 / "vlm_config.json"))
    assert config["tokens"] == 4 and config["compressor"] == "quecc" and config["key_layers"] == [3, 4, 6, 6]
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
    assert (tmp_path / "s2" / "llm" / "model.safetensors").exists()
    assert model.config["stage"] == 2
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


def test_mfu_counts_weight_gradients_only_when_the_llm_trains():
    import train
    tokenizer = toy.build_tokenizer()
    llm = toy.build_llm("toy", len(tokenizer))
    n = sum(p.numel() for p in llm.parameters())
    attention = 12 * 4 * 64 * 100  # layers x width x sequence, toy preset: 4 layers, width 64
    assert train.training_flops_per_token(llm, True, 100) == 6 * n + attention
    assert train.training_flops_per_token(llm, False, 100) == 4 * n + attention
