"""Answer a question about images with a trained VLM (nanoGPT's sample.py): one question, any
number of images, printed one answer a line.

    python generate.py --model runs/Qwen1.5-7B-Chat-quecc-v4/stage2 --image photo.jpg --question "What is written here?"
    python generate.py --model MODEL --static-query --question "Is the door open?" --image frame*.png

The plain path (plain_answers) renders one full prompt per image into left-padded batches
for vlm.generate, as 03_evaluate.py does. --static-query (StaticQuery) serves a fixed
question asked of many images (a camera asking the same thing of every frame) at the cost of
the visual tokens plus the answer. What it computes once, in __init__:
  * the question's embedding (QueCC's query: an extra LLM pass over the question), and
  * when the model was trained with the question before the image (`--image-after-question`,
    saved as `image_first: false`), the LLM's KV cache of the whole prompt prefix, i.e.
    everything before the image slots (chat template + question).
Each batch of images then costs the vision tower, the projector and an LLM prefill of only
V visual tokens plus the few template tokens after them, then greedy decoding, exactly as
vlm.generate (temperature 0, one beam). With the LLaVA order (image first) only the
question embedding is reused: the text after the image depends on it. All images of a call
share one prompt and one token count, so a batch needs no padding.
"""
import argparse
import copy
import os
import sys

import torch
from PIL import Image

import conversation
import vlm
from constants import IMAGE_SLOT


class UnreadableImage(ValueError):
    """An image file that does not decode; the message names it."""


def load_image(image, image_processor, aspect):
    """conversation.load_image, a file that fails to decode named in one line."""
    try:
        return conversation.load_image(image, image_processor, aspect)
    except Exception as e:
        raise UnreadableImage(f"{image}: cannot decode the image ({e})") from None


def plain_answers(model, tokenizer, image_processor, question, images, batch_size=16, max_new_tokens=128):
    """The ordinary path for one question over many images: a full prompt per image,
    left-padded batches, vlm.generate. What StaticQuery must reproduce, faster."""
    image_first = model.config.image_first
    device = next(model.llm.parameters()).device
    answers = []
    for start in range(0, len(images), batch_size):
        samples = []
        for image in images[start:start + batch_size]:
            sample = conversation.prompt(tokenizer, question, model.config.tokens, image_first,
                                         template=model.config.conv_template)
            sample["pixel_values"] = load_image(image, image_processor, model.config.image_aspect)
            samples.append(sample)
        batch = conversation.collate(samples, tokenizer.pad_token_id, left=True)
        answers += vlm.generate(model, tokenizer, {k: v.to(device) for k, v in batch.items()}, max_new_tokens)
    return answers


class StaticQuery:
    def __init__(self, model, tokenizer, image_processor, question, max_new_tokens=128, batch_size=16):
        self.model, self.tokenizer, self.image_processor = model, tokenizer, image_processor
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.image_first = model.config.image_first
        self.device = next(model.llm.parameters()).device
        sample = conversation.prompt(tokenizer, question, model.config.tokens, self.image_first,
                                     template=model.config.conv_template)
        self.input_ids = torch.tensor(sample["input_ids"], device=self.device)
        first_slot = sample["input_ids"].index(IMAGE_SLOT)

        with torch.no_grad():
            self.question = None
            if model.projector.needs_question:  # (1, d_llm), once for all images
                query = torch.tensor([sample["query_ids"]], device=self.device)
                self.question = model.question_embedding(query, torch.ones_like(query))

            # The prefix cache: only when the question comes before the image, else it would
            # cover a few template tokens and save nothing worth a second code path.
            self.prefix_cache, self.prefix_length = None, 0
            if not self.image_first and first_slot > 0:
                self.prefix_length = first_slot
                prefix = self.input_ids[None, :first_slot]
                out = model.llm(input_ids=prefix, attention_mask=torch.ones_like(prefix), use_cache=True,
                                logits_to_keep=1)
                self.prefix_cache = out.past_key_values

    @torch.no_grad()
    def answer(self, images):
        """images: file paths or PIL images -> one answer string per image, in order."""
        if isinstance(images, (str, Image.Image)):
            images = [images]
        answers = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            aspect = self.model.config.image_aspect
            pixels = torch.stack([load_image(image, self.image_processor, aspect) for image in chunk]).to(self.device)
            answers += self._answer_batch(pixels)
        return answers

    def _answer_batch(self, pixels):
        model, b = self.model, len(pixels)
        question = None if self.question is None else self.question.expand(b, -1)
        visual = model.visual_tokens(pixels, question)
        ids = self.input_ids.expand(b, -1)
        kwargs = {}
        if self.prefix_cache is not None:
            cache = copy.deepcopy(self.prefix_cache)  # generate() appends to it in place
            cache.batch_repeat_interleave(b)
            kwargs["past_key_values"] = cache
        # generate() embeds only the positions the cache does not hold yet: `rest`, whose
        # slots the hook fills. The prefix ids are there for the length and the positions.
        with model.armed(ids[:, self.prefix_length:], visual) as rest:
            input_ids = torch.cat([ids[:, :self.prefix_length], rest], dim=1)
            out = model.llm_generate(input_ids, torch.ones_like(input_ids), do_sample=False, num_beams=1,
                                     max_new_tokens=self.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                                     **kwargs)
        return [t.strip() for t in self.tokenizer.batch_decode(out[:, input_ids.shape[1]:],
                                                               skip_special_tokens=True)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="output directory of 02_finetune.py (or 01)")
    p.add_argument("--image", nargs="+", required=True, help="image files")
    p.add_argument("--question", required=True)
    p.add_argument("--static-query", action="store_true",
                   help="compute the question's embedding (and prompt cache) once for all images")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=128)
    args = p.parse_args()
    for name in ("batch_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for path in args.image:
        if not os.path.isfile(path):
            p.error(f"{path} is a directory; --image takes image files" if os.path.isdir(path) else f"image not found: {path}")
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model, tokenizer, image_processor = vlm.load_pretrained(args.model)
    model.to(device).eval()
    try:
        if args.static_query:
            texts = StaticQuery(model, tokenizer, image_processor, args.question, args.max_new_tokens,
                                args.batch_size).answer(args.image)
        else:
            texts = plain_answers(model, tokenizer, image_processor, args.question, args.image,
                                  args.batch_size, args.max_new_tokens)
    except UnreadableImage as e:
        sys.exit(f"error: {e}")
    for path, text in zip(args.image, texts):
        print(f"{path}: {text}" if len(args.image) > 1 else text)


if __name__ == "__main__":
    main()
