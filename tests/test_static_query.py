"""Static-query inference (generate.py) gives the plain path's answers, in both layouts.

The model is a random toy whose weights are redrawn at unit scale, so greedy answers differ
from image to image and from layout to layout (a default-init toy answers "" to everything,
which no comparison could catch). float64, so a reordered sum cannot flip a near-tie and the
test checks logic, not rounding.
"""
import contextlib

import numpy as np
import pytest
from PIL import Image, ImageDraw

import conftest
import conversation
from generate import StaticQuery, UnreadableImage, plain_answers

QUESTIONS = ["What colour is the shape?", "How many shapes are there? Answer the question using a single word."]
NEW_TOKENS = 6


pytestmark = pytest.mark.usefixtures("one_thread")


def sharp_model(compressor, tokens=4):
    model, tokenizer, image_processor = conftest.sharp_model(compressor, tokens, draw=8)  # 3+ answers in fp64
    return model.double(), tokenizer, image_processor


@pytest.fixture(scope="module")
def quecc():
    return sharp_model("quecc")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Eight scenes (a coloured square on a coloured ground); the first three also as files."""
    rng = np.random.default_rng(0)
    scenes = []
    for _ in range(8):
        image = Image.new("RGB", (96, 96), tuple(int(c) for c in rng.integers(0, 255, 3)))
        x, y = (int(v) for v in rng.integers(0, 60, 2))
        ImageDraw.Draw(image).rectangle((x, y, x + 30, y + 30), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        scenes.append(image)
    folder = tmp_path_factory.mktemp("frames")
    for i in range(3):
        scenes[i].save(folder / f"frame{i}.png")
        scenes[i] = str(folder / f"frame{i}.png")
    return scenes


@contextlib.contextmanager
def llm_prompt_lengths(model):
    """Records the sequence length of every LLM forward that is not a one-token decode step."""
    lengths = []
    forward = model.llm.forward

    def recording(*args, **kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1:
            lengths.append(ids.shape[1])
        return forward(*args, **kwargs)
    model.llm.forward = recording
    try:
        yield lengths
    finally:
        del model.llm.forward  # back to the class's method


@pytest.mark.parametrize("image_first", [True, False], ids=["image-first", "image-after-question"])
def test_static_query_answers_equal_the_plain_path(quecc, images, image_first, monkeypatch):
    model, tokenizer, image_processor = quecc
    monkeypatch.setattr(model.config, "image_first", image_first)
    for question in QUESTIONS:
        expected = plain_answers(model, tokenizer, image_processor, question, images, max_new_tokens=NEW_TOKENS)
        assert len(set(expected)) >= 3, f"answers do not depend on the image: {expected}"
        static = StaticQuery(model, tokenizer, image_processor, question, max_new_tokens=NEW_TOKENS)
        # what is reused: the question embedding always, the prefix KV cache only with the
        # question before the image; then each image's prefill is V tokens + the template's tail
        full = len(conversation.prompt(tokenizer, question, 4, image_first)["input_ids"])
        assert (static.prefix_cache is None) == image_first
        with llm_prompt_lengths(model) as lengths:
            assert static.answer(images) == expected
        assert lengths == [full - static.prefix_length], "the question pass or the prefix ran again"


def test_the_layouts_answer_differently(quecc, images, monkeypatch):
    """So the equality above can fail: a prefix cached in the wrong place changes the answers."""
    model, tokenizer, image_processor = quecc
    answers = {}
    for image_first in (True, False):
        monkeypatch.setattr(model.config, "image_first", image_first)
        answers[image_first] = StaticQuery(model, tokenizer, image_processor, QUESTIONS[0],
                                           max_new_tokens=NEW_TOKENS).answer(images)
    assert answers[True] != answers[False]


def test_text_free_compressor_with_prefix_cache(images, monkeypatch):
    model, tokenizer, image_processor = sharp_model("pool", tokens=16)
    monkeypatch.setattr(model.config, "image_first", False)
    expected = plain_answers(model, tokenizer, image_processor, QUESTIONS[1], images, max_new_tokens=NEW_TOKENS)
    static = StaticQuery(model, tokenizer, image_processor, QUESTIONS[1], max_new_tokens=NEW_TOKENS)
    assert static.question is None and static.prefix_cache is not None
    assert static.answer(images) == expected


def test_batching_images_equals_one_at_a_time(quecc, images, monkeypatch):
    model, tokenizer, image_processor = quecc
    for image_first in (True, False):
        monkeypatch.setattr(model.config, "image_first", image_first)
        one = StaticQuery(model, tokenizer, image_processor, QUESTIONS[0], NEW_TOKENS, batch_size=1)
        many = StaticQuery(model, tokenizer, image_processor, QUESTIONS[0], NEW_TOKENS, batch_size=5)
        singles = one.answer(images)
        assert many.answer(images) == singles  # batches of 5 and 3: no padding, same answers
        one_by_one = plain_answers(model, tokenizer, image_processor, QUESTIONS[0], images, batch_size=1,
                                   max_new_tokens=NEW_TOKENS)
        assert one_by_one == singles


@pytest.mark.parametrize("script, extra", [
    ("bench_prefill", ["--tokens", "1,576", "--throughput-batch", "0"]),
    ("bench_overhead", ["--compressors", "quecc,mlp"]),
    ("bench_decode", ["--tokens", "1,576", "--batches", "2", "--new-tokens", "2"]),
    ("bench_static_query", ["--images", "2", "--batches", "2", "--new-tokens", "2"]),
])
def test_bench_scripts_run_on_cpu(script, extra, tmp_path, monkeypatch):
    """Smoke test, not a timing: each bench script runs on a toy model and writes its JSON
    (in this process: a subprocess would spend most of its time importing)."""
    import importlib
    import json
    import os

    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    out = tmp_path / "out.json"
    monkeypatch.setattr("sys.argv", [script, "--llm", "toy-xs", "--vision", "toy", "--rounds", "1",
                                     "--out", str(out), *extra])
    importlib.import_module(script).main()
    result = json.loads(out.read_text())
    assert result["rows"]
    if script == "bench_prefill":
        row = next(r for r in result["rows"] if r["text_tokens"] == 50 and r["tokens"] == 1)
        assert {"tokens", "text_tokens", "ms", "measured_speedup", "predicted_speedup"} <= set(row)
        assert row["predicted_speedup"] == pytest.approx(626 / 51)
    if script == "bench_static_query":
        assert all(r["answers_equal"] for r in result["rows"])


def test_an_image_that_does_not_decode_is_named(quecc, images, tmp_path):
    """A truncated file passes generate.py's existence check; both paths name it when it fails to decode."""
    model, tokenizer, image_processor = quecc
    broken = tmp_path / "broken.png"
    broken.write_bytes(open(images[1], "rb").read()[:100])
    paths = [images[1], str(broken)]
    with pytest.raises(UnreadableImage, match=f"{broken}: cannot decode the image"):
        plain_answers(model, tokenizer, image_processor, QUESTIONS[0], paths, max_new_tokens=1)
    with pytest.raises(UnreadableImage, match=f"{broken}: cannot decode the image"):
        StaticQuery(model, tokenizer, image_processor, QUESTIONS[0], max_new_tokens=1).answer(paths)
