"""The toy world: scenes, questions and their answers, the pretrained toy models and their cache."""
import json
import os
import random
import re

import pytest
import torch
from PIL import Image

import conversation
import toy
import vlm
from conftest import run_script
from toy import make_data, pretrain

OBJECT = re.compile(r"an? (\w+) (\w+) at the ([\w ]+?)(?:,|\.$)")
WORD = re.compile(r'the word "(\w+)" at the ([\w ]+?)(?:,|\.$)')
PLURAL = {shape + ("es" if shape.endswith("s") else "s"): shape for shape in toy.SHAPES}


def scene_from_words(text):
    """A caption read back into (objects, word): the scene in words must say all there is."""
    objects = [(c, s, toy.POSITIONS.index(p)) for c, s, p in OBJECT.findall(text)]
    word = WORD.search(text)
    return dict(objects=objects, word=(word[1], toy.POSITIONS.index(word[2])) if word else None)


def truth(scene, question):
    """The answer to a toy question, worked out from the scene here, independently of the generator.
    An ambiguous question (no unique object to ask about, a tie to compare) is an error."""
    objects, numbers = scene["objects"], toy.NUMBERS

    def only(found):
        assert len(found) == 1, (question, scene)
        return found[0]

    def count(test):
        return numbers[sum(map(test, objects))]

    if m := re.fullmatch(r"What colour is the shape (left of|right of|above|below) the (\w+)\?", question):
        row, col = divmod(only([cell for _, s, cell in objects if s == m[2]]), 3)
        offsets = {"left of": lambda r, c: r == row and c < col, "right of": lambda r, c: r == row and c > col,
                   "above": lambda r, c: c == col and r < row, "below": lambda r, c: c == col and r > row}[m[1]]
        return only([c for c, _, cell in objects if offsets(*divmod(cell, 3))])
    if m := re.fullmatch(r"What colour is the (\w+)\?", question):
        return only([c for c, s, _ in objects if s == m[1]])
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        return only([s for c, s, _ in objects if c == m[1]])
    if m := re.fullmatch(r"How many shapes are not (\w+)\?", question):
        return count(lambda o: o[0] != m[1])
    if m := re.fullmatch(r"How many (\w+) are not (\w+)\?", question):
        return count(lambda o: o[1] == PLURAL[m[1]] and o[0] != m[2])
    if m := re.fullmatch(r"How many (\w+) shapes are there\?", question):
        return count(lambda o: o[0] == m[1])
    if m := re.fullmatch(r"How many (\w+) are there\?", question):
        return count(lambda o: o[1] == PLURAL[m[1]])
    if m := re.fullmatch(r"Are there more (\w+) than (\w+)\?", question):
        a, b = (sum(o[1] == PLURAL[x] for o in objects) for x in (m[1], m[2]))
        assert a != b, (question, scene)
        return "yes" if a > b else "no"
    if m := re.fullmatch(r"Is there (an?) (\w+) (\w+)\?", question):
        assert m[1] == ("an" if m[2][0] in "aeiou" else "a"), question  # "a orange" was once asked
        return "yes" if any((c, s) == (m[2], m[3]) for c, s, _ in objects) else "no"
    if question == "What word is written in the image?":
        return scene["word"][0]
    raise AssertionError(f"a question of no known form: {question!r}")


def asked(text):
    return text.replace("<image>", "").replace(make_data.SHORT, "").strip()


def test_every_answer_of_the_data_matches_its_scene(toy_data):
    """Training conversations and held-out questions alike, against scenes.json; no turn's question
    gives another turn's answer away (the LLM would copy it instead of reading the image), and the
    caption that closes each training conversation comes after every question."""
    scenes = json.load(open(toy_data / "scenes.json"))
    kinds = set()
    for record in json.load(open(toy_data / "finetune.json")):
        if "image" not in record:
            continue
        turns = record["conversations"]
        pairs = [(asked(turns[k]["value"]), turns[k + 1]["value"]) for k in range(0, len(turns), 2)]
        (request, described), pairs = pairs[-1], pairs[:-1]
        assert request in make_data.DESCRIBE and pairs, (record["id"], request)
        assert json.loads(json.dumps(scene_from_words(described))) == scenes[record["image"]], record["id"]
        for question, answer in pairs:
            assert answer == truth(scenes[record["image"]], question), (record["id"], question)
            assert not any(f" {answer} " in f" {other.rstrip('?')} " for other, _ in pairs), (record["id"], pairs)
    for bench in ("toy_reasoning", "toy_ocr"):
        for line in open(toy_data / "eval" / bench / "questions.jsonl"):
            q = json.loads(line)
            assert q["answers"] == [truth(scenes[q["image"]], q["question"])], q
            kinds.add(q["category"])
    assert kinds == set(make_data.REASONING) | {"ocr"}
    for image, scene in scenes.items():  # several objects, each alone in its cell
        cells = [cell for *_, cell in scene["objects"]] + ([scene["word"][1]] if scene["word"] else [])
        assert 2 <= len(scene["objects"]) <= 5 and len(set(cells)) == len(cells), image


def test_the_pretraining_corpus_is_true_to_the_scene_in_words():
    """Every answer of the LLMs' text corpus follows from the scene the conversation describes: one
    question (or a request to describe it) per scene, of every type."""
    rng, kinds = random.Random(3), set()
    for _ in range(600):
        (human, gpt) = pretrain.text_conversation(rng, describe=0.2)
        words, question = human["value"].split("\n", 1)
        scene = scene_from_words(words)
        assert make_data.caption(scene) == words
        if question in make_data.DESCRIBE:
            assert gpt["value"] == words
            kinds.add("describe")
        else:
            assert gpt["value"] == truth(scene, asked(question)), (words, question)
            kinds.add(" ".join(question.split()[:2]))
    assert len(kinds) == 7, kinds  # describe; What colour / shape / word, How many, Are there, Is there


def test_the_text_ceiling_asks_the_vlms_own_questions(toy_data):
    """scenes.jsonl is the reasoning benchmark's question file, each with its image's caption."""
    scenes = json.load(open(toy_data / "scenes.json"))
    in_words = [json.loads(line) for line in open(toy_data / "eval" / "toy_reasoning" / "scenes.jsonl")]
    questions = [json.loads(line) for line in open(toy_data / "eval" / "toy_reasoning" / "questions.jsonl")]
    assert [{k: v for k, v in row.items() if k != "scene"} for row in in_words] == questions
    assert all(row["scene"] == make_data.caption(scenes[row["image"]]) for row in in_words)


@pytest.mark.parametrize("size", ["toy-xxs", "toy-s"])
def test_a_pretrained_llm_reasons_over_the_scene_in_words(toy_data, size):
    """The shipped LLM's text ceiling stands well above the same LLM before pretraining, which
    answers at most by the answer prior."""
    rows = [json.loads(line) for line in open(toy_data / "eval" / "toy_reasoning" / "scenes.jsonl")]
    tokenizer = toy.build_tokenizer()
    pretrained = pretrain.text_ceiling(toy.load_llm(size)[0], tokenizer, rows)["accuracy"]
    untrained = pretrain.text_ceiling(toy.build_llm(size, len(tokenizer)), tokenizer, rows)["accuracy"]
    assert pretrained > untrained + 20, (pretrained, untrained)


def test_the_shipped_models_are_what_the_pretrain_command_makes():
    """The settings recorded beside each shipped checkpoint are those `python -m toy.pretrain` uses
    today (recipe, architecture, tokenizer, the world's text): change one and the test says which
    checkpoint to remake. The shipped files stay small."""
    for name in ("toy-xxs", "toy-xs", "toy-s", toy.VISION):
        folder = os.path.join(toy.SHIPPED, name)
        recorded = json.load(open(os.path.join(folder, toy.SETTINGS_FILE)))
        assert recorded == pretrain.settings(name), f"remake it: python -m toy.pretrain --models {name}"
        assert toy.pretrained_dir(name) == folder
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(toy.SHIPPED) for f in files)
    assert size < 10 * 2 ** 20, size


def test_the_pretraining_cache_is_reused_and_remade_when_its_settings_change(tmp_path, monkeypatch):
    args = ["-m", "toy.pretrain", "--models", "toy-xxs,vision", "--root", str(tmp_path), "--conversations", "64",
            "--images", "32"]
    first = run_script(*args)
    weights = tmp_path / "toy-xxs" / "model.safetensors"
    made = weights.stat().st_mtime_ns
    assert json.loads((tmp_path / "toy-xxs" / toy.SETTINGS_FILE).read_text())["conversations"] == 64
    assert (tmp_path / "vision" / "model.safetensors").exists() and "up to date" not in first.stdout
    curve = json.loads((tmp_path / "toy-xxs" / "pretrain_log.json").read_text())["text_ceiling"]
    assert [point["step"] for point in curve] == [1, 2] and set(make_data.REASONING) < set(curve[-1])
    again = run_script(*args)
    assert again.stdout.count("up to date") == 2 and weights.stat().st_mtime_ns == made
    changed = run_script(*[a if a != "64" else "96" for a in args])
    assert changed.stdout.count("up to date") == 1 and weights.stat().st_mtime_ns != made
    assert json.loads((tmp_path / "toy-xxs" / toy.SETTINGS_FILE).read_text())["conversations"] == 96
    # the loader takes a cached model only while its settings are today's
    monkeypatch.setattr(toy, "CACHED", str(tmp_path))
    monkeypatch.setitem(pretrain.LLM_RECIPE, "conversations", 96)
    assert toy.pretrained_dir("toy-xxs") == str(tmp_path / "toy-xxs")
    monkeypatch.setitem(pretrain.LLM_RECIPE, "conversations", 128)
    assert toy.pretrained_dir("toy-xxs") is None
    with pytest.raises(SystemExit, match="python -m toy.pretrain --models toy-xxs"):
        toy.load_llm("toy-xxs")


def test_a_tower_pretrained_on_other_images_is_stale(monkeypatch):
    """The tower's settings fingerprint the world's images as an LLM's do its text: with the world
    drawn otherwise, the shipped tower is not taken (the LLMs, which read no image, still are)."""
    assert toy.pretrained_dir(toy.VISION) == os.path.join(toy.SHIPPED, toy.VISION)
    render = make_data.render
    monkeypatch.setattr(make_data, "render", lambda scene: render(scene).transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    assert toy.pretrained_dir(toy.VISION) is None
    assert toy.pretrained_dir("toy-s") == os.path.join(toy.SHIPPED, "toy-s")


def test_the_pretrained_tower_carries_each_objects_colour_and_shape(toy_data):
    """Colour and shape of each object are linearly readable from its cell's mean patch feature at
    the layer the projector reads, on held-out objects: the frozen tower passes the scene on."""
    model, _, processor = vlm.build("toy-xs", "toy", 1, "pool")
    scenes = json.load(open(toy_data / "scenes.json"))
    pixels = torch.stack([conversation.load_image(str(toy_data / "images" / image), processor) for image in scenes])
    with torch.no_grad():
        cells = pretrain.cell_features(model.vision, pixels)  # (images, 9, width)
    features, colours, shapes = [], [], []
    for image_cells, scene in zip(cells, scenes.values()):
        for colour, shape, cell in scene["objects"]:
            features.append(image_cells[cell])
            colours.append(toy.COLOURS.index(colour))
            shapes.append(toy.SHAPES.index(shape))
    x = torch.stack(features)
    split = int(0.8 * len(x))
    x = (x - x[:split].mean(0)) / x[:split].std(0)
    for name, labels, classes in (("colour", colours, toy.COLOURS), ("shape", shapes, toy.SHAPES)):
        y = torch.tensor(labels)
        torch.manual_seed(0)
        probe = torch.nn.Linear(x.shape[1], len(classes))
        optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2)
        for _ in range(300):
            loss = torch.nn.functional.cross_entropy(probe(x[:split]), y[:split])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        accuracy = (probe(x[split:]).argmax(-1) == y[split:]).float().mean().item()
        assert accuracy > 0.9, f"{name}: held-out probe accuracy {accuracy:.2f} on {len(x) - split} objects"


def test_every_toy_answer_is_one_token(tokenizer):
    """Answers start their turn without a space; each is one token, as common words are in a real
    vocabulary (a spelled-out answer makes the toy LLM learn spelling before reading images)."""
    for word in toy.COLOURS + toy.SHAPES + toy.NUMBERS + toy.WORDS + ["yes", "no"]:
        assert len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1, word
