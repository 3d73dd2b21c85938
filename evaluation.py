"""Answering benchmark questions with a model in memory: what 03_evaluate.py and training's
--eval-every share. The question files and their images, the prompts (LLaVA-1.5's, rendered as the
model trained), the batches each process answers, and the headline of a benchmark's scores.

Training's evaluation (live_scores) answers exactly as 03_evaluate.py run with as many processes and
--batch-size BATCH_SIZE answers the saved model: each process takes every world-th question, in the
same batches. Under FSDP the LLM stays sharded (no second copy): every process then runs the same
LLM calls, so each answers as many batches (a process with fewer repeats one, unrecorded) and decodes
until every process is done (vlm.generate's synced).
"""
import math
import os
import sys

import torch

import benchmarks
import conversation
import distributed
import features
import vlm

BATCH_SIZE = 16  # 03_evaluate.py's --batch-size and training's evaluation batches


def fail(message):
    sys.exit(f"error: {message}")


def check_images(questions, image_folder, questions_path):
    missing = [q for q in questions if not os.path.exists(os.path.join(image_folder, q["image"]))]
    if missing:
        fail(f"{questions_path}: {len(missing)} of {len(questions)} questions have no image in {image_folder}, "
             f"e.g. question {missing[0]['question_id']}: {os.path.join(image_folder, missing[0]['image'])}")


def read_benchmark(data_root, name):
    """-> its questions, checked (and their images found) before the model loads."""
    if name not in benchmarks.BENCHMARKS:
        fail(f"unknown benchmark {name!r}; valid: {', '.join(benchmarks.BENCHMARKS)}")
    path = os.path.join(data_root, name, "questions.jsonl")
    if not os.path.exists(path):
        fail(f"{path} not found: fetch {name} from its official source and convert it with "
             f"python data_prep/convert_benchmarks.py {name} --src ... --out {path}, images in "
             f"{os.path.join(data_root, name, 'images')} (docs/evaluation.md)")
    try:
        questions = benchmarks.load_questions(path)
    except (OSError, ValueError) as e:
        fail(e)
    check_images(questions, os.path.join(data_root, name, "images"), path)
    return questions


def feature_cache(directory, model, image_processor, benches, data_root, rank):
    """A features.FeatureCache in `directory` holding every image of benches ({name: questions}),
    encoded by rank 0 (the others wait for it); an image that cannot be decoded stops the run."""
    cache = features.FeatureCache(directory, model, image_processor, model.config.image_aspect)
    paths = [os.path.join(data_root, bench, "images", q["image"]) for bench, questions in benches.items()
             for q in questions]
    failed = distributed.from_rank0(cache.prepare(paths, desc="benchmark image features")[1] if rank == 0 else None)
    if failed:
        fail(f"{len(failed)} benchmark images cannot be decoded, e.g. {next(iter(failed.values()))}")
    return cache


class Prompts(torch.utils.data.Dataset):
    """A benchmark's prompts and images (or, from a feature_cache, the images' vision features)."""
    def __init__(self, bench, questions, image_folder, tokenizer, image_processor, config, cache=None):
        self.bench, self.questions, self.image_folder = bench, questions, image_folder
        self.tokenizer, self.image_processor, self.config, self.cache = tokenizer, image_processor, config, cache

    def __len__(self):
        return len(self.questions)

    def __getitem__(self, index):
        record = self.questions[index]
        text = benchmarks.build_prompt(self.bench, record)
        sample = conversation.prompt(self.tokenizer, text, self.config.tokens,
                                     self.config.image_first, template=self.config.conv_template)
        image = os.path.join(self.image_folder, record["image"])
        sample["pixel_values"] = None
        if self.cache is not None:
            sample["features"] = self.cache.load(image)
            sample["prompt"] = text
            return sample
        try:
            sample["pixel_values"] = conversation.load_image(image, self.image_processor,
                                                             self.config.image_aspect)
        except Exception as e:  # in a loader worker, whose exception would reach the user as two tracebacks
            return dict(error=f"{image}: cannot decode the image of question {record['question_id']} ({e}); "
                              "replace the file, or drop the question from the question file")
        sample["prompt"] = text
        return sample


def batches_to_answer(questions, batch_size, answered):
    """Fixed batches over this rank's questions, sorted by prompt length so a batch pads little.
    A batch is redone whole unless all of it is answered, so a resumed run forms exactly the
    batches an uninterrupted run forms and gets exactly its answers."""
    order = sorted(range(len(questions)), key=lambda i: len(questions[i]["question"]))
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return [c for c in chunks if not all(str(questions[i]["question_id"]) in answered for i in c)]


def headline(metrics):
    """The scores a results row and a training log keep of a benchmark's metrics."""
    return dict(metric=metrics["headline"], score=metrics[metrics["headline"]], normalized=metrics["normalized"],
                per_category=metrics.get("per_category", {}))


@torch.no_grad()
def live_scores(model, tokenizer, image_processor, benches, data_root, max_new_tokens, rank, world, device, cache=None):
    """{benchmark: headline scores} of the model as it is now, on benches ({name: questions}); every
    process calls it. cache: a feature_cache holding the benches' images."""
    scores = {}
    for bench, questions in benches.items():
        mine = questions[rank::world]
        batches = batches_to_answer(mine, BATCH_SIZE, {})
        rounds = math.ceil(math.ceil(len(questions) / world) / BATCH_SIZE)  # the batches of the largest share
        prompts = Prompts(bench, mine or questions[:1], os.path.join(data_root, bench, "images"), tokenizer,
                          image_processor, model.config, cache)
        rows = []
        for k, indices in enumerate(batches + (batches[:1] or [[0]]) * (rounds - len(batches))):
            samples = [prompts[i] for i in indices]
            if any("error" in s for s in samples):
                fail(next(s["error"] for s in samples if "error" in s))
            batch = conversation.collate(samples, tokenizer.pad_token_id, left=True)
            texts = vlm.generate(model, tokenizer, conversation.to_device(batch, device), max_new_tokens, synced=world > 1)
            if k < len(batches):
                rows += [dict(question_id=mine[i]["question_id"], prompt=s["prompt"], text=text)
                         for i, s, text in zip(indices, samples, texts)]
        scores[bench] = headline(benchmarks.score(bench, questions, [row for share in distributed.all_ranks(rows) for row in share]))
    return scores
