"""Generate the toy world: coloured shapes on a 3x3 grid, some images with a word written in.

Writes, deterministically from --seed, in LLaVA's formats:
  OUT/images/*.png
  OUT/pretrain.json        stage 1: image + caption (the human turn asks for a description)
  OUT/finetune.json        stage 2: multi-turn questions and answers, plus text-only samples
  OUT/eval/toy_reasoning/questions.jsonl  held-out images: colour, shape, count, position, existence
  OUT/eval/toy_ocr/questions.jsonl        held-out images: "what word is written?"
The eval folders follow 03_evaluate.py's --data-root layout (BENCH/questions.jsonl, BENCH/images/)
and its question format (question_id, image, question, answers, category = question type).

    python data_prep/make_toy_data.py --out data/toy
"""
import argparse
import json
import os
import random
import sys

from PIL import Image, ImageDraw
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from toy import COLOURS, NUMBERS, POSITIONS, SHAPES, VISION_IMAGE_SIZE, WORDS  # noqa: E402

RGB = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
       "yellow": (230, 210, 30), "purple": (140, 50, 170), "orange": (240, 130, 20)}
SIZE = VISION_IMAGE_SIZE
CELL = SIZE // 3
SHORT = "\nAnswer the question using a single word or phrase."
DESCRIBE = ["Describe the image briefly.", "What is in this picture?", "Give a short caption.",
            "Summarise the image."]


def draw_shape(draw, shape, colour, cell):
    row, col = divmod(cell, 3)
    x0, y0, r = col * CELL + 5, row * CELL + 5, CELL - 10
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


def make_scene(rng, with_word):
    """-> dict(objects=[(colour, shape, cell)], word=(text, cell) or None), all cells distinct,
    colours distinct and shapes distinct so every question has one answer."""
    count = rng.randint(1, 3)
    cells = rng.sample(range(9), count + with_word)
    objects = list(zip(rng.sample(COLOURS, count), rng.sample(SHAPES, count), cells))
    word = (rng.choice(WORDS), cells[-1]) if with_word else None
    return dict(objects=objects, word=word)


def render(scene, path):
    image = Image.new("RGB", (SIZE, SIZE), (235, 235, 235))
    draw = ImageDraw.Draw(image)
    for colour, shape, cell in scene["objects"]:
        draw_shape(draw, shape, colour, cell)
    if scene["word"]:
        text, cell = scene["word"]
        row, col = divmod(cell, 3)
        draw.text((col * CELL + 6, row * CELL + 10), text, fill=(0, 0, 0), font_size=14)
    image.save(path)


def caption(scene):
    parts = [f"a {c} {s} at the {POSITIONS[cell]}" for c, s, cell in scene["objects"]]
    if scene["word"]:
        parts.append(f'the word "{scene["word"][0]}" at the {POSITIONS[scene["word"][1]]}')
    return ", ".join(parts) + "."


def questions(rng, scene):
    """All question types this scene can answer: -> [(type, question, answer)]."""
    colour, shape, cell = rng.choice(scene["objects"])
    absent = rng.choice([(c, s) for c in COLOURS for s in SHAPES
                         if (c, s) not in {(o[0], o[1]) for o in scene["objects"]}])
    asked = rng.choice([(colour, shape), absent])
    out = [("colour", f"What colour is the {shape}?", colour),
           ("shape", f"What shape is the {colour} object?", shape),
           ("count", "How many shapes are there?", NUMBERS[len(scene["objects"])]),
           ("position", f"Where is the {colour} {shape}?", POSITIONS[cell]),
           ("exists", f"Is there a {asked[0]} {asked[1]}?", "yes" if asked == (colour, shape) else "no")]
    if scene["word"]:
        out.append(("ocr", "What word is written in the image?", scene["word"][0]))
    return out


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
                        help="questions (turns) per training image, each of a different type; 0: 1 to 3 at random")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    os.makedirs(os.path.join(args.out, "images"), exist_ok=True)
    pretrain, finetune, reasoning, ocr = [], [], [], []
    for i in tqdm(range(args.num_train + args.num_eval), desc="toy images"):
        scene = make_scene(rng, rng.random() < args.word_fraction)
        image = f"{'train' if i < args.num_train else 'eval'}_{i:06d}.png"
        render(scene, os.path.join(args.out, "images", image))
        qa = questions(rng, scene)
        if i >= args.num_train:  # held out: one question of each type
            for kind, question, answer in qa:
                target = ocr if kind == "ocr" else reasoning
                target.append({"question_id": f"{image[:-4]}-{kind}", "image": image,
                               "question": question, "answers": [answer], "category": kind})
            continue
        pretrain.append({"id": f"cap-{i}", "image": image, "conversations": [
            {"from": "human", "value": with_image_tag(rng, rng.choice(DESCRIBE))},
            {"from": "gpt", "value": caption(scene)}]})
        turns = []
        asked = min(args.questions_per_image, len(qa)) if args.questions_per_image else rng.randint(1, min(3, len(qa)))
        for kind, question, answer in rng.sample(qa, asked):
            turns += [{"from": "human", "value": question + SHORT}, {"from": "gpt", "value": answer}]
        turns[0]["value"] = with_image_tag(rng, turns[0]["value"])
        finetune.append({"id": f"qa-{i}", "image": image, "conversations": turns})
        if i % 20 == 0:
            finetune.append(text_only_sample(rng, i))

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
