"""Generate the toy world: one to three copies of a coloured shape on a 2x2 grid, some images with a word.

Writes, deterministically from --seed, in LLaVA's formats:
  OUT/images/*.png
  OUT/scenes.json          every image's objects (colour, shape, cell) and word: the ground truth,
                           for checks and diagnostics
  OUT/pretrain.json        stage 1: image + caption (the human turn asks for a description)
  OUT/finetune.json        stage 2: multi-turn questions and answers, plus text-only samples
  OUT/eval/toy_reasoning/questions.jsonl  held-out images: colour, shape, count, position, existence
  OUT/eval/toy_ocr/questions.jsonl        held-out images: "what word is written?"
The eval folders follow 03_evaluate.py's --data-root layout (BENCH/questions.jsonl, BENCH/images/)
and its question format (question_id, image, question, answers, category = question type).

    python -m toy.make_data --out data/toy
"""
import argparse
import json
import math
import os
import random

from PIL import Image, ImageDraw
from tqdm import tqdm

from toy import COLOURS, NUMBERS, POSITIONS, SHAPES, VISION_IMAGE_SIZE, WORDS

RGB = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
       "yellow": (230, 210, 30), "purple": (140, 50, 170), "orange": (240, 130, 20)}
SIZE = VISION_IMAGE_SIZE
SIDE = 2  # cells per side: a cell is 12x12 patches, so V = 4, 16 and 144 give each cell whole tokens
CELL = SIZE // SIDE
SHORT = "\nAnswer the question using a single word or phrase."
DESCRIBE = ["Describe the image briefly.", "What is in this picture?", "Give a short caption.",
            "Summarise the image."]


def draw_shape(draw, shape, colour, cell):
    row, col = divmod(cell, SIDE)
    x0, y0, r = col * CELL + 3, row * CELL + 3, CELL - 6  # an object fills its cell: more patches show its shape
    box, fill = (x0, y0, x0 + r, y0 + r), RGB[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0 + r / 2, y0), (x0, y0 + r), (x0 + r, y0 + r)], fill=fill)
    else:  # cross
        w = r // 3
        draw.rectangle((x0 + w, y0, x0 + 2 * w, y0 + r), fill=fill)
        draw.rectangle((x0, y0 + w, x0 + r, y0 + 2 * w), fill=fill)


def make_scene(rng, with_word, kind=None):
    """-> dict(objects=[(colour, shape, cell)], word=(text, cell) or None): one to three copies of
    one coloured shape in distinct cells. One kind of object per image keeps every question a
    read of the whole picture: which colour goes with which shape among several different objects
    (binding) is more than a toy LLM trained from scratch learns in a CPU budget (docs/toy_world.md)."""
    count = rng.randint(1, 3)
    colour, shape = kind or (rng.choice(COLOURS), rng.choice(SHAPES))
    cells = rng.sample(range(SIDE * SIDE), count + with_word)
    word = (rng.choice(WORDS), cells[-1]) if with_word else None
    return dict(objects=[(colour, shape, cell) for cell in cells[:count]], word=word)


def render(scene, path):
    image = Image.new("RGB", (SIZE, SIZE), (235, 235, 235))
    draw = ImageDraw.Draw(image)
    for colour, shape, cell in scene["objects"]:
        draw_shape(draw, shape, colour, cell)
    if scene["word"]:
        text, cell = scene["word"]
        row, col = divmod(cell, SIDE)
        draw.text((col * CELL + 10, row * CELL + 16), text, fill=(0, 0, 0), font_size=14)
    image.save(path)


def caption(scene):
    parts = [f"a {c} {s} at the {POSITIONS[cell]}" for c, s, cell in scene["objects"]]
    if scene["word"]:
        parts.append(f'the word "{scene["word"][0]}" at the {POSITIONS[scene["word"][1]]}')
    return ", ".join(parts) + "."


def questions(rng, scene):
    """One question of each type this scene can answer: -> [(type, question, answer)]. Position is
    asked only of a single object, the one case with a one-phrase answer."""
    colour, shape, cell = scene["objects"][0]
    count = len(scene["objects"])
    absent = rng.choice([(c, s) for c in COLOURS for s in SHAPES if (c, s) != (colour, shape)])
    asked = rng.choice([(colour, shape), absent])
    one = count == 1
    out = [("colour", f"What colour {'is the shape' if one else 'are the shapes'}?", colour),
           ("shape", f"What shape {'is the object' if one else 'are the objects'}?", shape),
           ("count", "How many shapes are there?", NUMBERS[count]),
           ("exists", f"Is there a {asked[0]} {asked[1]}?", "yes" if asked == (colour, shape) else "no")]
    if one:
        out.append(("position", "Where is the shape?", POSITIONS[cell]))
    if scene["word"]:
        out.append(("ocr", "What word is written in the image?", scene["word"][0]))
    return out


def gives_away(question, answer):
    return f" {answer} " in f" {question.rstrip('?')} "


def training_questions(rng, scene, limit):
    """Up to `limit` questions for one training conversation, none of which gives away another's
    answer ("Is there a red circle?" answers "What colour is the shape?"). With such leaks a
    small LLM can learn to copy answers from earlier turns instead of reading the image, and a
    one-question evaluation gives it nothing to copy."""
    candidates = questions(rng, scene)
    rng.shuffle(candidates)
    chosen = []
    for kind, question, answer in candidates:
        if len(chosen) < limit and not any(gives_away(question, a) or gives_away(q, answer) for _, q, a in chosen):
            chosen.append((kind, question, answer))
    return chosen


def text_only_sample(rng, index):
    word = rng.choice(WORDS)
    return {"id": f"text-{index}", "conversations": [
        {"from": "human", "value": f"Spell the word {word}."},
        {"from": "gpt", "value": " ".join(word)}]}


def with_image_tag(rng, text):
    """LLaVA data puts <image> at the start or the end of the first human turn."""
    return f"<image>\n{text}" if rng.random() < 0.7 else f"{text}\n<image>"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/toy")
    parser.add_argument("--num-train", type=int, default=2000, help="training images")
    parser.add_argument("--num-eval", type=int, default=300, help="held-out images")
    parser.add_argument("--word-fraction", type=float, default=0.5, help="images with a word in them")
    parser.add_argument("--questions-per-image", type=int, default=0,
                        help="questions (turns) per training image, at most; 0: 1 to 3 at random")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    os.makedirs(os.path.join(args.out, "images"), exist_ok=True)
    pretrain, finetune, reasoning, ocr, scenes = [], [], [], [], {}
    for i in tqdm(range(args.num_train + args.num_eval), desc="toy images"):
        held_out = i >= args.num_train
        # held-out images take colours and shapes in turn, each pairing once per 24 images (the
        # shape steps one further every lcm(6, 4) = 12), so each is asked about equally often and
        # a majority answer scores chance
        j = i - args.num_train
        cycle = math.lcm(len(COLOURS), len(SHAPES))
        kind = (COLOURS[j % len(COLOURS)], SHAPES[(j + j // cycle) % len(SHAPES)]) if held_out else None
        scene = make_scene(rng, rng.random() < args.word_fraction, kind)
        image = f"{'eval' if held_out else 'train'}_{i:06d}.png"
        render(scene, os.path.join(args.out, "images", image))
        scenes[image] = scene
        if held_out:  # one question of each type
            for kind, question, answer in questions(rng, scene):
                target = ocr if kind == "ocr" else reasoning
                target.append({"question_id": f"{image[:-4]}-{kind}", "image": image,
                               "question": question, "answers": [answer], "category": kind})
            continue
        pretrain.append({"id": f"cap-{i}", "image": image, "conversations": [
            {"from": "human", "value": with_image_tag(rng, rng.choice(DESCRIBE))},
            {"from": "gpt", "value": caption(scene)}]})
        turns = []
        for kind, question, answer in training_questions(rng, scene, args.questions_per_image or rng.randint(1, 3)):
            turns += [{"from": "human", "value": question + SHORT}, {"from": "gpt", "value": answer}]
        turns[0]["value"] = with_image_tag(rng, turns[0]["value"])
        finetune.append({"id": f"qa-{i}", "image": image, "conversations": turns})
        if i % 20 == 0:
            finetune.append(text_only_sample(rng, i))

    with open(os.path.join(args.out, "scenes.json"), "w") as f:
        json.dump(scenes, f)
    with open(os.path.join(args.out, "pretrain.json"), "w") as f:
        json.dump(pretrain, f)
    with open(os.path.join(args.out, "finetune.json"), "w") as f:
        json.dump(finetune, f)
    for bench, rows in (("toy_reasoning", reasoning), ("toy_ocr", ocr)):  # 03_evaluate's --data-root layout
        folder = os.path.join(args.out, "eval", bench)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "questions.jsonl"), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        if not os.path.lexists(os.path.join(folder, "images")):
            os.symlink(os.path.join("..", "..", "images"), os.path.join(folder, "images"))
    print(f"{args.out}: {len(pretrain)} captions, {len(finetune)} finetune samples, "
          f"{len(reasoning)} reasoning and {len(ocr)} OCR held-out questions")


if __name__ == "__main__":
    main()
