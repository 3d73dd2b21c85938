"""A trained VLM is a Hugging Face model folder: transformers loads it without this repository and
it answers as generate.py does; its processor makes generate.py's inputs; a folder of the earlier
layout is refused by name and converted; training's --eval-every scores as 03_evaluate.py does."""
import argparse
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import compressors
import conversation
import convert_model
import evaluation
import generate
import toy
import train
import vlm
from constants import IMAGE_SLOT
from conftest import ROOT, run_script, sharp_model
from processing_vlm import VLMProcessor

QUESTIONS = ["What colour is the shape?", "How many shapes are there? Answer the question using a single word."]
NEW_TOKENS = 6
# the README's snippet, run on each folder with each image and question, in a process that must not find
# this repository; then what push_to_hub uploads: the first model and processor as loaded, saved again
SNIPPET = """
import importlib.util, json, sys
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
assert importlib.util.find_spec("vlm") is None, "the repository is importable"

def load(folder):
    return (AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True),
            AutoProcessor.from_pretrained(folder, trust_remote_code=True))

def ask(model, processor, image, question):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[Image.open(image)], text=prompt, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=%d, do_sample=False)
    return processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

jobs, answers = json.loads(sys.argv[1]), {}
for folder, images, questions in jobs:
    model, processor = load(folder)
    answers[folder] = [ask(model, processor, image, question) for question in questions for image in images]
folder, images, questions = jobs[0]
model, processor = load(folder)
model.save_pretrained("resaved")
processor.save_pretrained("resaved")
answers["resaved"] = [ask(*load("resaved"), images[0], questions[0])]
print(json.dumps(answers))
""" % NEW_TOKENS


pytestmark = pytest.mark.usefixtures("one_thread")  # and one in the snippet's process: the same sums


def without_chat_template(directory):
    """A toy LLM directory whose tokenizer has no chat template, as Vicuna-1.5's."""
    (directory / "chat_template.jinja").unlink(missing_ok=True)
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({k: v for k, v in config.items() if k != "chat_template"}))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{name: saved model folder}: one per compressor (weights redrawn so answers vary), QueCC with the
    image after the question, and QueCC on an LLM without a chat template (vicuna_v1)."""
    root = tmp_path_factory.mktemp("folders")
    llm_dir, _ = toy.save_toy_models(root / "models", llm="toy-xs")
    without_chat_template(root / "models" / "llm")
    made = {}
    cases = [(c, {"mlp": 576, "pixelshuffle": 16}.get(c, 4), "toy-xs", {}) for c in compressors.COMPRESSORS]
    cases += [("quecc-after", 4, "toy-xs", dict(image_first=False)), ("quecc-vicuna", 4, llm_dir,
                                                                       dict(conv_template="vicuna_v1"))]
    for name, tokens, llm, settings in cases:
        model, tokenizer, _ = sharp_model(name.split("-")[0], tokens, llm)
        model.config.update(settings)
        vlm.save(model, tokenizer, root / name, save_llm=True, extra_config=dict(stage=2))
        made[name] = root / name
    return made


@pytest.fixture(scope="module")
def images(toy_data):
    folder = toy_data / "eval" / "toy_reasoning" / "images"
    return [str(folder / name) for name in sorted(os.listdir(folder))[:3]]


def snippet_answers(jobs, tmp_path):
    """The snippet in a fresh Python whose working directory and path hold nothing of this
    repository, offline. jobs: [(folder, images, questions)] -> {folder: answers}."""
    env = dict(PATH=os.environ["PATH"], HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", SNIPPET, json.dumps(jobs)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def test_the_readme_snippet_outside_the_repository_answers_as_generate_py(folders, images, tmp_path):
    """Every compressor, the image after the question, a template-less LLM: the snippet's answers,
    stripped as generate.py prints them, are generate.py's (its plain path, one image a batch as in the
    snippet), question by question and image by image."""
    jobs = [(str(tmp_path / name), images, QUESTIONS) for name in folders]
    for name, folder in folders.items():  # copies: nothing of the run that saved them is left around
        shutil.copytree(folder, tmp_path / name)
    got = snippet_answers(jobs, tmp_path)
    for name, folder in folders.items():
        model, tokenizer, image_processor = vlm.load_pretrained(folder)
        expected = [answer for question in QUESTIONS for answer in generate.plain_answers(
            model, tokenizer, image_processor, question, images, batch_size=1, max_new_tokens=NEW_TOKENS)]
        assert len(set(expected)) > 1, f"{name}: answers do not vary, the comparison could not fail"
        assert [answer.strip() for answer in got[str(tmp_path / name)]] == expected, name
    assert got["resaved"] == got[jobs[0][0]][:1]


@pytest.mark.parametrize("name", ["quecc", "quecc-after", "quecc-vicuna", "pool"])
def test_the_processor_makes_generate_pys_inputs(folders, images, name):
    """The processor's ids, QueCC's question and pixels equal conversation.prompt's and load_image's for
    the template and image order the model trained with; several prompts pad to the left alike."""
    folder = folders[name]
    config = vlm.read_config(folder)
    processor = VLMProcessor.from_pretrained(folder, config=config)
    prompts, samples = [], []
    for question in QUESTIONS:
        messages = [{"role": "user", "content": [{"type": "text", "text": question}, {"type": "image"}]}]
        prompts.append(processor.apply_chat_template(messages, add_generation_prompt=True))
        samples.append(conversation.prompt(processor.tokenizer, question, config.tokens, config.image_first,
                                           template=config.conv_template))
        samples[-1]["pixel_values"] = conversation.load_image(images[0], processor.image_processor, config.image_aspect)
    inputs = processor(images=[images[0]] * 2, text=prompts)
    expected = conversation.collate(samples, processor.tokenizer.pad_token_id, left=True)
    slots = inputs["input_ids"] == config.image_token_id
    assert slots.sum() == 2 * config.tokens and processor.tokenizer.convert_ids_to_tokens(config.image_token_id) == "<image>"
    assert torch.equal(inputs["input_ids"].masked_fill(slots, IMAGE_SLOT), expected["input_ids"])
    assert torch.equal(inputs["attention_mask"], expected["attention_mask"])
    assert torch.equal(inputs["pixel_values"], expected["pixel_values"])
    if name == "pool":  # reads no question: none made
        assert "query_ids" not in inputs
        return
    assert torch.equal(inputs["query_ids"], expected["query_ids"])
    assert processor.question(prompts[1]) == QUESTIONS[1]
    # the first user turn is the question in a conversation that goes on, too
    turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[0]}]},
             {"role": "assistant", "content": "red"}, {"role": "user", "content": QUESTIONS[1]}]
    assert processor.question(processor.apply_chat_template(turns, add_generation_prompt=True)) == QUESTIONS[0]
    with pytest.raises(ValueError, match="cannot find the question in the prompt"):
        processor(images=[images[0]], text="<image>\n" + QUESTIONS[0])


def test_the_folder_holds_its_model_its_code_and_a_model_card(folders):
    folder = folders["quecc-vicuna"]
    names = set(os.listdir(folder))
    assert {"config.json", "model.safetensors", "generation_config.json", "processor_config.json", "tokenizer.json",
            "modeling_vlm.py", "processing_vlm.py", "compressors.py", "quecc.py", "conversation.py", "constants.py",
            "README.md"} <= names
    assert not names & {"llm", "projector.safetensors", "vlm_config.json", ".saving"}
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "modeling_vlm.VLMConfig", "AutoModelForImageTextToText": "modeling_vlm.VLM"}
    card = (folder / "README.md").read_text()
    for fact in ("base LLM | `" + str(vlm.read_config(folder).llm) + "`", "vision tower | `toy`", "`quecc`, V = 4",
                 "template `vicuna_v1`", "pipeline_tag: image-text-to-text"):
        assert fact in card, fact
    for name in ("modeling_vlm.py", "compressors.py", "conversation.py"):  # this repository's own code, copied
        assert (folder / name).read_text() == open(os.path.join(ROOT, name)).read()


def test_a_model_folder_as_llm_is_refused_naming_the_llm_it_was_trained_from(folders):
    with pytest.raises(SystemExit, match=f"error: --llm {folders['pool']} is an output of 01/02 .* trained from: toy-xs"):
        vlm.build(str(folders["pool"]), "toy", 4, "pool")


def legacy_output(model, tokenizer, directory, stage2):
    """An output directory as 01/02 wrote it before model folders: vlm_config.json, projector.safetensors
    and the LLM with its tokenizer under llm/ (stage 2) or the tokenizer under tokenizer/ (stage 1)."""
    directory.mkdir()
    config = {k: v for k, v in model.config.to_dict().items() if k in (
        "llm", "vision", "tokens", "compressor", "grid", "select_layer", "key_layers", "vision_width", "llm_width",
        "llm_dtype", "conv_template", "image_aspect", "image_first", "loss_norm", "stage")}
    config["stage"] = 2 if stage2 else 1
    if stage2:
        model.llm.save_pretrained(directory / "llm")
        config["llm_dir"] = "llm"
    tokenizer.save_pretrained(directory / ("llm" if stage2 else "tokenizer"))
    save_file({k: v.contiguous() for k, v in model.projector.state_dict().items()}, directory / "projector.safetensors")
    (directory / "vlm_config.json").write_text(json.dumps(config))


def test_an_output_of_the_earlier_layout_is_refused_by_name_and_converts(images, tmp_path, monkeypatch):
    model, tokenizer, image_processor = sharp_model("quecc", 4)
    legacy_output(model, tokenizer, tmp_path / "stage1", stage2=False)
    legacy_output(model, tokenizer, tmp_path / "stage2", stage2=True)
    for projector in (str(tmp_path / "stage1"), None):  # given, or the stage1 folder next to --output-dir
        args = argparse.Namespace(llm="toy-xs", vision="toy", compressor="quecc", tokens=4, data=str(tmp_path),
                                  image_folder=str(tmp_path), output_dir=str(tmp_path / "next"), train_llm=True,
                                  show_samples=0, projector=projector)
        with pytest.raises(SystemExit, match=f"convert it once: python convert_model.py {tmp_path / 'stage1'}"):
            train.fill_defaults(args, dict(output="stage2", source=""))
    for stage in ("stage1", "stage2"):
        with pytest.raises(SystemExit, match=f"error: {tmp_path / stage} is a 01/02 output in the layout before "
                                             f"Hugging Face model folders .*python convert_model.py {tmp_path / stage}"):
            vlm.load_pretrained(tmp_path / stage)
        monkeypatch.setattr(sys, "argv", ["convert_model.py", str(tmp_path / stage)])
        convert_model.main()
    assert sorted(os.listdir(tmp_path / "stage1")) == ["config.json", "projector.safetensors", "tokenizer"]
    vlm.load_projector(vlm.build("toy-xs", "toy", 4, "quecc")[0], tmp_path / "stage1")  # stage 2 can start from it
    expected = generate.plain_answers(model, tokenizer, image_processor, QUESTIONS[0], images, max_new_tokens=NEW_TOKENS)
    converted = vlm.load_pretrained(tmp_path / "stage2")
    assert generate.plain_answers(*converted, QUESTIONS[0], images, max_new_tokens=NEW_TOKENS) == expected
    assert converted[0].config.stage == 2 and not (tmp_path / "stage2" / "llm").exists()


def eval_root(toy_data, root, questions):
    """A data root holding toy_reasoning with these questions and the toy world's images."""
    (root / "toy_reasoning").mkdir(parents=True)
    (root / "toy_reasoning" / "images").symlink_to(toy_data / "eval" / "toy_reasoning" / "images")
    (root / "toy_reasoning" / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    return root


def test_eval_every_under_fsdp_scores_as_03_on_the_model_saved_at_that_step(toy_data, tmp_path):
    """Two processes, the LLM sharded: the scores training logs at its last step are those 03 gives the
    saved model, with as many processes. The run starts from a sharp toy, whose answers vary, and every
    other question's reference is what that toy answers: the scores are near 50%, not 0, and move with
    any answer that changes. 33 questions of 41 (--eval-limit): one process answers two batches, the
    other one, and repeats it."""
    model, tokenizer, image_processor = sharp_model("quecc", 4)
    model.llm.save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    model.config.llm = str(tmp_path / "llm")
    vlm.save(model, tokenizer, tmp_path / "stage1", save_llm=False)
    questions = [json.loads(line) for line in open(toy_data / "eval" / "toy_reasoning" / "questions.jsonl")]
    prompts = evaluation.Prompts("toy_reasoning", questions, toy_data / "eval" / "toy_reasoning" / "images",
                                 tokenizer, image_processor, model.config)
    answers = []
    for start in range(0, len(questions), 16):
        batch = conversation.collate([prompts[i] for i in range(start, min(start + 16, len(questions)))],
                                     tokenizer.pad_token_id, left=True)
        answers += vlm.generate(model, tokenizer, batch, 4)
    for question, answer in list(zip(questions, answers))[::2]:
        question["answers"] = [answer]
    run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", "02_finetune.py", "--llm", str(tmp_path / "llm"),
               "--vision", "toy", "--tokens", "4", "--projector", str(tmp_path / "stage1"),
               "--data", str(toy_data / "finetune.json"), "--image-folder", str(toy_data / "images"),
               "--output-dir", str(tmp_path / "stage2"), "--max-steps", "2", "--batch-size", "4",
               "--micro-batch-size", "2", "--lr", "1e-5", "--num-workers", "0", "--eval-every", "2",
               "--eval-bench", "toy_reasoning", "--eval-limit", "33", "--eval-max-new-tokens", "4",
               "--eval-data-root", str(eval_root(toy_data, tmp_path / "all", questions)),
               env=dict(os.environ, OMP_NUM_THREADS="1"))
    log = [json.loads(line) for line in open(tmp_path / "stage2" / "log.jsonl")]
    assert "eval" not in log[0] and set(log[1]["eval"]) == {"toy_reasoning"}
    live = log[1]["eval"]["toy_reasoning"]
    run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", "03_evaluate.py", "--model",
               str(tmp_path / "stage2"), "--bench", "toy_reasoning", "--max-new-tokens", "4",
               "--data-root", str(eval_root(toy_data, tmp_path / "first33", questions[:33])),
               env=dict(os.environ, OMP_NUM_THREADS="1"))
    result = json.loads((tmp_path / "stage2" / "eval" / "results.jsonl").read_text())
    assert 25 < live["score"] < 75, live  # neither all right nor all wrong: the comparison can fail
    assert live == {k: result[k] for k in ("metric", "score", "normalized", "per_category")}
    card = (tmp_path / "stage2" / "README.md").read_text()  # the model card: how it was trained, its scores
    assert f"| data | `{toy_data / 'finetune.json'}` |" in card and "| training | stage 2: 2 steps of 4 samples, lr 1e-05 |" in card
    assert f"| toy_reasoning | accuracy | {live['score']:.2f} |" in card
