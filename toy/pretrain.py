"""Pretrain the toy world's models once, before any VLM is built, as a real LLM and CLIP are.

    python -m toy.pretrain                              # toy-xxs, toy-xs, toy-s and the tower -> toy/pretrained/
    python -m toy.pretrain --models toy-m --root cache/pretrained   # a --full size, on first use

LLMs: each size from its random init (toy.build_llm) on the same text corpus for the same number of
conversations (LLM_RECIPE, same tokens for every size): scenes of the toy world described in words
(make_data.caption), each followed by one of its questions, or by a request to describe it (so
the LLM already speaks the captions stage 1 trains on). Loss on the answers only, AdamW, linear
warm-up then cosine decay; the text ceiling on fresh scenes is logged as it goes. The vision
tower: the toy CLIP from its random init, trained to name, per cell of the 3x3 grid, the colour
and shape of the object there (or none) and the word written there (or none), read from its
cell's mean patch feature of the layer the projector reads.
Every folder records its settings (SETTINGS_FILE: recipe, architecture and a fingerprint of the
world it learned); a folder whose settings differ from today's is stale and is made again.
--models picks which, --conversations / --images shorten the recipe (tests).
"""
import argparse
import hashlib
import json
import math
import os
import random
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import benchmarks
import conversation
import toy
from constants import IGNORE
from modeling_vlm import SELECT_LAYER
from toy import make_data

LLM_RECIPE = dict(conversations=256000, batch_size=32, lr=1e-3, warmup=100, describe=0.1, seed=0, max_length=256)
VISION_RECIPE = dict(images=6400, batch_size=16, lr=2e-3, warmup=40, seed=0)


def settings(name, **overrides):
    """What decides a pretrained model: its recipe, its architecture, and the world it learns,
    fingerprinted: an LLM's by the tokenizer and a few of the corpus's conversations, the tower's by
    a few of its images (images_fingerprint)."""
    if name == toy.VISION:
        architecture = {k: v for k, v in toy.vision_config().to_diff_dict().items() if k != "transformers_version"}
        return dict(model=name, architecture=architecture, world=images_fingerprint(), **dict(VISION_RECIPE, **overrides))
    # the rate up to width 128, times 128/width above (toy-l): an Adam step moves a layer's output in
    # proportion to width x lr, and the probe behind docs/toy_world.md saw width 128 stall at 2e-3
    recipe = dict(LLM_RECIPE, lr=LLM_RECIPE["lr"] * min(1, 128 / toy.LLM_SIZES[name][0]), **overrides)
    sample = json.dumps([text_conversation(random.Random(0), recipe["describe"]) for _ in range(20)])
    return dict(model=name, architecture=list(toy.LLM_SIZES[name]), tokenizer=toy.tokenizer_hash(),
                world=hashlib.sha1(sample.encode()).hexdigest()[:16], **recipe)


def images_fingerprint():
    """The world's images as the tower learns them, a few rendered scenes with their per-cell labels:
    a change to how the world is drawn makes a pretrained tower stale, as its text does an LLM."""
    rng, digest = random.Random(0), hashlib.sha1()
    for _ in range(20):
        scene = make_data.make_scene(rng, rng.random() < 0.5)
        digest.update(make_data.render(scene).tobytes())
        digest.update(json.dumps(scene_labels(scene)).encode())
    return digest.hexdigest()[:16]


def text_conversation(rng, describe):
    """A scene in words and one question about it (or a request to describe it), in LLaVA's turns.
    One question, as the held-out evaluation asks: a type shares the corpus with seven others, and
    with several questions per scene the mixture taught no size to count (docs/toy_world.md)."""
    scene = make_data.make_scene(rng, rng.random() < 0.5)
    words = make_data.caption(scene)
    if rng.random() < describe:
        question, answer = rng.choice(make_data.DESCRIBE), words
    else:
        _, question, answer = rng.choice(make_data.questions(rng, scene))
        question += make_data.SHORT
    return [{"from": "human", "value": f"{words}\n{question}"},  # the scene in the place of the image
            {"from": "gpt", "value": answer}]


def held_out_rows(seed, scenes=100):
    """Fresh scenes in words with one question of each reasoning type, as scenes.jsonl rows."""
    rng = random.Random(seed)
    rows = []
    for _ in range(scenes):
        scene = make_data.make_scene(rng, rng.random() < 0.5)
        rows += [{"scene": make_data.caption(scene), "question": q, "answers": [a], "category": kind}
                 for kind, q, a in make_data.questions(rng, scene) if kind != "ocr"]
    return rows


def schedule(step, steps, warmup):
    return min(1, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))


def pretrain_llm(name, recipe):
    torch.manual_seed(recipe["seed"])
    rng = random.Random(recipe["seed"])
    tokenizer = toy.build_tokenizer()
    model = toy.build_llm(name, len(tokenizer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=0.0)
    steps = recipe["conversations"] // recipe["batch_size"]
    held_out, every, curve = held_out_rows(recipe["seed"] + 1), max(1, steps // 8), []
    losses = []
    for step in tqdm(range(steps), desc=f"pretrain {name}"):
        samples = [conversation.tokenize(tokenizer, text_conversation(rng, recipe["describe"]), 0, recipe["max_length"])
                   for _ in range(recipe["batch_size"])]
        ids = conversation.pad([s["input_ids"] for s in samples], tokenizer.pad_token_id)
        labels = conversation.pad([s["labels"] for s in samples], IGNORE)
        for group in optimizer.param_groups:
            group["lr"] = recipe["lr"] * schedule(step, steps, recipe["warmup"])
        loss = model(input_ids=ids, attention_mask=ids != tokenizer.pad_token_id, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % every == 0 or step + 1 == steps:  # when each type is learned, per size
            ceiling = text_ceiling(model, tokenizer, held_out)
            curve.append(dict(step=step + 1, accuracy=round(ceiling["accuracy"], 1),
                              **{kind: round(v, 1) for kind, v in ceiling["per_category"].items()}))
            tqdm.write(json.dumps(curve[-1]))
            model.train()
    return model, dict(loss_first=sum(losses[:20]) / 20, loss_last=sum(losses[-20:]) / 20, text_ceiling=curve)


@torch.no_grad()
def text_ceiling(model, tokenizer, rows, batch_size=64):
    """Accuracy of a toy LLM on questions with the scene in words (make_data's scenes.jsonl rows),
    prompted and scored as 03_evaluate.py prompts and scores the VLM on the same questions, the
    image's place taken by the words. -> {"accuracy": %, "per_category": {type: %}}"""
    model.eval()
    answers = []
    tokenizer.padding_side = "left"
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        prompts = [conversation.prompt(tokenizer, f"{r['scene']}\n{r['question']}{make_data.SHORT}", 0,
                                       with_image=False)["input_ids"] for r in batch]
        ids = conversation.pad(prompts, tokenizer.pad_token_id, left=True)
        mask = conversation.pad([[1] * len(p) for p in prompts], 0, left=True)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        answers += tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    scores = [float(benchmarks.toy_correct(r, a.strip())) for r, a in zip(rows, answers)]
    return benchmarks.accuracy_metrics(rows, scores)


def cell_features(vision, pixels):
    """(images, 9 cells, width): the mean patch feature of each cell at the layer the projector reads."""
    states = vision(pixel_values=pixels, output_hidden_states=True).hidden_states[SELECT_LAYER][:, 1:]
    grid, side = int(states.shape[1] ** 0.5), make_data.SIDE
    states = states.reshape(len(pixels), side, grid // side, side, grid // side, -1)
    return states.mean((2, 4)).flatten(1, 2)


def scene_labels(scene):
    """Per cell: colour, shape and word indices, the last index of each meaning none."""
    colour, shape, word = ([n] * make_data.SIDE ** 2 for n in (len(toy.COLOURS), len(toy.SHAPES), len(toy.WORDS)))
    for c, s, cell in scene["objects"]:
        colour[cell], shape[cell] = toy.COLOURS.index(c), toy.SHAPES.index(s)
    if scene["word"]:
        word[scene["word"][1]] = toy.WORDS.index(scene["word"][0])
    return colour, shape, word


def image_batch(rng, processor, size):
    scenes = [make_data.make_scene(rng, rng.random() < 0.5) for _ in range(size)]
    pixels = processor([make_data.render(s) for s in scenes], return_tensors="pt")["pixel_values"]
    return pixels, [torch.tensor(labels) for labels in zip(*map(scene_labels, scenes))]


def pretrain_vision(recipe):
    torch.manual_seed(recipe["seed"])
    rng = random.Random(recipe["seed"])
    vision, processor = toy.build_vision(), toy.build_image_processor()
    width = vision.config.hidden_size
    heads = torch.nn.ModuleList(torch.nn.Linear(width, n + 1) for n in (len(toy.COLOURS), len(toy.SHAPES), len(toy.WORDS)))
    optimizer = torch.optim.AdamW([*vision.parameters(), *heads.parameters()], lr=recipe["lr"], weight_decay=0.0)
    steps = recipe["images"] // recipe["batch_size"]
    for step in tqdm(range(steps), desc="pretrain vision"):
        pixels, labels = image_batch(rng, processor, recipe["batch_size"])
        features = cell_features(vision, pixels)
        loss = sum(F.cross_entropy(head(features).flatten(0, 1), y.flatten()) for head, y in zip(heads, labels))
        for group in optimizer.param_groups:
            group["lr"] = recipe["lr"] * schedule(step, steps, recipe["warmup"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():  # per-cell accuracy on fresh scenes: what the frozen tower's features carry
        pixels, labels = image_batch(random.Random(recipe["seed"] + 1), processor, 256)
        features = cell_features(vision, pixels)
        accuracy = {what: round(100 * (head(features).argmax(-1) == y).float().mean().item(), 1)
                    for what, head, y in zip(("colour", "shape", "word"), heads, labels)}
    return vision, dict(loss_last=loss.item(), cell_accuracy=accuracy)


def pretrain(name, root, **overrides):
    """Make root/NAME unless it is there with these settings. -> its folder."""
    wanted = settings(name, **overrides)
    folder = os.path.join(root, name)
    if toy.made_with(folder, wanted):
        print(f"{folder}: up to date")
        return folder
    started = time.time()
    recipe = {k: v for k, v in wanted.items() if k not in ("model", "architecture", "tokenizer", "world")}
    if name == toy.VISION:
        model, log = pretrain_vision(recipe)
        toy.build_image_processor().save_pretrained(folder)
    else:
        model, log = pretrain_llm(name, recipe)
    model.save_pretrained(folder)
    log.update(seconds=round(time.time() - started, 1), threads=torch.get_num_threads())
    with open(os.path.join(folder, "pretrain_log.json"), "w") as f:
        json.dump(log, f, indent=2)
    with open(os.path.join(folder, toy.SETTINGS_FILE), "w") as f:  # last: a folder with settings is complete
        json.dump(wanted, f, indent=2)
    print(f"{folder}: {json.dumps(log)}")
    return folder


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=f"toy-xxs,toy-xs,toy-s,{toy.VISION}",
                   help=f"comma-separated: {', '.join(toy.PRETRAINED_LLMS)}, {toy.VISION}")
    p.add_argument("--root", default=toy.SHIPPED, help="where the models' folders go")
    p.add_argument("--conversations", type=int, help=f"LLM pretraining conversations (default {LLM_RECIPE['conversations']})")
    p.add_argument("--images", type=int, help=f"vision pretraining images (default {VISION_RECIPE['images']})")
    args = p.parse_args()
    for name in args.models.split(","):
        if name not in (*toy.PRETRAINED_LLMS, toy.VISION):
            p.error(f"unknown model {name!r}; choose from {', '.join(toy.PRETRAINED_LLMS)}, {toy.VISION}")
        override = args.images if name == toy.VISION else args.conversations
        pretrain(name, args.root, **({"images" if name == toy.VISION else "conversations": override} if override else {}))


if __name__ == "__main__":
    main()
