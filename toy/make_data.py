"""Generate the toy world: two to five coloured shapes on a 3x3 grid, some images with a word.

Each scene holds several different objects, so a question needs part of the picture and which
colour goes with which shape and where (binding): counting by attribute, comparing counts,
spatial relations, existence, negation and their combinations (docs/toy_world.md).
Writes, deterministically from --seed, in LLaVA's formats:
  OUT/images/*.png
  OUT/scenes.json          every image's objects (colour, shape, cell) and word: the ground truth
  OUT/pretrain.json        stage 1: image + caption (the human turn asks for a description)
  OUT/finetune.json        stage 2: multi-turn questions and answers closed by the caption, plus
                           text-only samples
  OUT/eval/toy_reasoning/questions.jsonl  held-out images: one question of each reasoning type
  OUT/eval/toy_ocr/questions.jsonl        held-out images: "what word is written?"
  OUT/eval/toy_reasoning/scenes.jsonl     the same questions with the scene in words (`scene`),
                                          what the text ceiling (toy/pretrain.py) answers
The eval folders follow 03_evaluate.py's --data-root layout (BENCH/questions.jsonl, BENCH/images/)
and its question format (question_id, image, question, answers, category = question type).

    python -m toy.make_data --out data/toy
"""
import argparse
import hashlib
import json
import os
import random
import tempfile

from PIL import Image, ImageDraw
from tqdm import tqdm

from toy import COLOURS, NUMBERS, POSITIONS, RELATIONS, SHAPES, VISION_IMAGE_SIZE, WORDS

RGB = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
       "yellow": (230, 210, 30), "purple": (140, 50, 170), "orange": (240, 130, 20)}
SIZE = VISION_IMAGE_SIZE
SIDE = 3  # cells per side: a cell is 8x8 patches
CELL = SIZE // SIDE
SHORT = "\nAnswer the question using a single word or phrase."  # 03_evaluate.py's instruction for toy questions
DESCRIBE = ["Describe the image briefly.", "What is in this picture?", "Give a short caption.",
            "Summarise the image."]
REASONING = ["lookup", "count", "compare", "relation", "exists", "negation", "combination"]


def draw_shape(draw, shape, colour, cell):
    row, col = divmod(cell, SIDE)
    x0, y0, r = col * CELL + 4, row * CELL + 4, CELL - 8
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
    """-> dict(objects=[(colour, shape, cell)] in cell order, word=(text, cell) or None): two to
    five objects, each of a random colour and shape, in distinct cells."""
    count = rng.randint(2, 5)
    cells = rng.sample(range(SIDE * SIDE), count + with_word)
    objects = sorted((rng.choice(COLOURS), rng.choice(SHAPES), cell) for cell in cells[:count])
    word = (rng.choice(WORDS), cells[-1]) if with_word else None
    return dict(objects=sorted(objects, key=lambda o: o[2]), word=word)


def render(scene):
    image = Image.new("RGB", (SIZE, SIZE), (235, 235, 235))
    draw = ImageDraw.Draw(image)
    for colour, shape, cell in scene["objects"]:
        draw_shape(draw, shape, colour, cell)
    if scene["word"]:
        text, cell = scene["word"]
        row, col = divmod(cell, SIDE)
        draw.text((col * CELL + 4, row * CELL + 9), text, fill=(0, 0, 0), font_size=12)
    return image


def article(colour):
    return "an" if colour == "orange" else "a"


def caption(scene):
    """The scene in words: what stage 1 learns to say from the image, and what the text ceiling
    and the LLMs' pretraining read in its place."""
    parts = [f"{article(c)} {c} {s} at the {POSITIONS[cell]}" for c, s, cell in scene["objects"]]
    if scene["word"]:
        parts.append(f'the word "{scene["word"][0]}" at the {POSITIONS[scene["word"][1]]}')
    return ", ".join(parts) + "."


def plural(shape):
    return shape + ("es" if shape.endswith("s") else "s")


def related(a, b, relation):
    """Is the object in cell a `relation` (left of, right of, above, below) the one in cell b?"""
    (ra, ca), (rb, cb) = divmod(a, SIDE), divmod(b, SIDE)
    return {"left of": ra == rb and ca < cb, "right of": ra == rb and ca > cb,
            "above": ca == cb and ra < rb, "below": ca == cb and ra > rb}[relation]


def questions(rng, scene):
    """One question of each type this scene can answer: -> [(type, question, answer)]. A type whose
    question would be ambiguous here (no unique object to ask about) is left out."""
    objects = scene["objects"]
    colours, shapes = [o[0] for o in objects], [o[1] for o in objects]
    out = []
    unique_shapes = [s for s in SHAPES if shapes.count(s) == 1]
    unique_colours = [c for c in COLOURS if colours.count(c) == 1]
    if unique_shapes and (not unique_colours or rng.random() < 0.5):
        shape = rng.choice(unique_shapes)
        out.append(("lookup", f"What colour is the {shape}?", colours[shapes.index(shape)]))
    elif unique_colours:
        colour = rng.choice(unique_colours)
        out.append(("lookup", f"What shape is the {colour} object?", shapes[colours.index(colour)]))
    # counted: mostly something in the scene, so that "zero" is not the usual answer
    if rng.random() < 0.5:
        shape = rng.choice(shapes if rng.random() < 0.75 else SHAPES)
        out.append(("count", f"How many {plural(shape)} are there?", NUMBERS[shapes.count(shape)]))
    else:
        colour = rng.choice(colours if rng.random() < 0.75 else COLOURS)
        out.append(("count", f"How many {colour} shapes are there?", NUMBERS[colours.count(colour)]))
    a, b = rng.sample(SHAPES, 2)
    if shapes.count(a) != shapes.count(b):  # a tie would make "more" a trick question
        out.append(("compare", f"Are there more {plural(a)} than {plural(b)}?", "yes" if shapes.count(a) > shapes.count(b) else "no"))
    asked = []  # (relation, anchor shape, the one object in that relation to it)
    for anchor in unique_shapes:
        cell = objects[shapes.index(anchor)][2]
        for relation in RELATIONS:
            found = [o for o in objects if related(o[2], cell, relation)]
            if len(found) == 1:
                asked.append((relation, anchor, found[0]))
    if asked:
        relation, anchor, (colour, _, _) = rng.choice(asked)
        out.append(("relation", f"What colour is the shape {relation} the {anchor}?", colour))
    present = rng.random() < 0.5
    colour, shape = (rng.choice([(c, s) for c, s, _ in objects]) if present else
                     rng.choice([(c, s) for c in COLOURS for s in SHAPES if (c, s) not in zip(colours, shapes)]))
    out.append(("exists", f"Is there {article(colour)} {colour} {shape}?", "yes" if present else "no"))
    colour = rng.choice(colours)
    out.append(("negation", f"How many shapes are not {colour}?", NUMBERS[len(objects) - colours.count(colour)]))
    shape, colour = rng.choice(shapes), rng.choice(colours)
    out.append(("combination", f"How many {plural(shape)} are not {colour}?",
                NUMBERS[sum(s == shape and c != colour for c, s in zip(colours, shapes))]))
    if scene["word"]:
        out.append(("ocr", "What word is written in the image?", scene["word"][0]))
    return out


def gives_away(question, answer):
    return f" {answer} " in f" {question.rstrip('?')} "


def conversation_questions(rng, scene, limit):
    """Up to `limit` questions for one conversation, none of which gives away another's answer
    ("Is there a red circle?" answers "What colour is the circle?"). With such leaks a small LLM
    can learn to copy answers from earlier turns instead of reading the scene, and a one-question
    evaluation gives it nothing to copy."""
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


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def generate(out, num_train, num_eval, word_fraction=0.5, questions_per_image=0, seed=0, progress=True):
    """Write the world into out (the files the module's docstring lists)."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    pretrain, finetune, reasoning, ocr, in_words, scenes = [], [], [], [], [], {}
    for i in tqdm(range(num_train + num_eval), desc="toy images", disable=not progress):
        held_out = i >= num_train
        scene = make_scene(rng, rng.random() < word_fraction)
        image = f"{'eval' if held_out else 'train'}_{i:06d}.png"
        render(scene).save(os.path.join(out, "images", image))
        scenes[image] = scene
        if held_out:  # one question of each type
            for kind, question, answer in questions(rng, scene):
                row = {"question_id": f"{image[:-4]}-{kind}", "image": image, "question": question,
                       "answers": [answer], "category": kind}
                (ocr if kind == "ocr" else reasoning).append(row)
                if kind != "ocr":
                    in_words.append(dict(row, scene=caption(scene)))
            continue
        words = caption(scene)
        pretrain.append({"id": f"cap-{i}", "image": image, "conversations": [
            {"from": "human", "value": with_image_tag(rng, rng.choice(DESCRIBE))},
            {"from": "gpt", "value": words}]})
        turns = []
        for kind, question, answer in conversation_questions(rng, scene, questions_per_image or rng.randint(1, 3)):
            turns += [{"from": "human", "value": question + SHORT}, {"from": "gpt", "value": answer}]
        # Last, stage 1's caption again: most of LLaVA-665K's answer tokens are long answers
        # (LLaVA-Instruct, ShareGPT), and one-word answers alone teach a VLM little of reading the
        # image. Last, so that no question can copy its answer from it. (The prompts in turn: the
        # random draws, and so the scenes and held-out questions, stay as they were without it.)
        turns += [{"from": "human", "value": DESCRIBE[i % len(DESCRIBE)]}, {"from": "gpt", "value": words}]
        turns[0]["value"] = with_image_tag(rng, turns[0]["value"])
        finetune.append({"id": f"qa-{i}", "image": image, "conversations": turns})
        if i % 20 == 0:
            finetune.append(text_only_sample(rng, i))

    with open(os.path.join(out, "scenes.json"), "w") as f:
        json.dump(scenes, f)
    with open(os.path.join(out, "pretrain.json"), "w") as f:
        json.dump(pretrain, f)
    with open(os.path.join(out, "finetune.json"), "w") as f:
        json.dump(finetune, f)
    for bench, rows in (("toy_reasoning", reasoning), ("toy_ocr", ocr)):  # 03_evaluate's --data-root layout
        folder = os.path.join(out, "eval", bench)
        os.makedirs(folder, exist_ok=True)
        write_jsonl(os.path.join(folder, "questions.jsonl"), rows)
        if not os.path.lexists(os.path.join(folder, "images")):
            os.symlink(os.path.join("..", "..", "images"), os.path.join(folder, "images"))
    write_jsonl(os.path.join(out, "eval", "toy_reasoning", "scenes.jsonl"), in_words)
    return len(pretrain), len(finetune), len(reasoning), len(ocr)


def fingerprint(**settings):
    """What generate writes with these settings, at 21 training images (a text-only sample at the
    first and the last) and 3 held-out ones, in 16 hex digits: the demo keeps it beside its runs,
    so that data made by another generator is refused, not reused (toy/demo.py). Images count by
    their pixels, not their PNG bytes, which another Pillow may compress otherwise."""
    digest = hashlib.sha1()
    with tempfile.TemporaryDirectory() as out:
        generate(out, num_train=21, num_eval=3, progress=False, **settings)
        for folder, _, files in sorted(os.walk(out)):  # the eval folders' image links are not followed
            for name in sorted(files):
                path = os.path.join(folder, name)
                digest.update(os.path.relpath(path, out).encode())
                if name.endswith(".png"):
                    with Image.open(path) as image:
                        digest.update(image.tobytes())
                else:
                    digest.update(open(path, "rb").read())
    return digest.hexdigest()[:16]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/toy")
    parser.add_argument("--num-train", type=int, default=2000, help="training images")
    parser.add_argument("--num-eval", type=int, default=300, help="held-out images")
    parser.add_argument("--word-fraction", type=float, default=0.5, help="images with a word in them")
    parser.add_argument("--questions-per-image", type=int, default=0,
                        help="questions per training image, at most, before its caption; 0: 1 to 3 at random")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    captions, finetune, reasoning, ocr = generate(args.out, args.num_train, args.num_eval, args.word_fraction,
                                                  args.questions_per_image, args.seed)
    print(f"{args.out}: {captions} captions, {finetune} finetune samples, "
          f"{reasoning} reasoning and {ocr} OCR held-out questions")


if __name__ == "__main__":
    main()
