"""Conversations -> model inputs: images, chat templates, label masks, batches.

The records come from LLaVA's JSON files (llava_data.py). Three templates (--conv-template), the
label spans placed by character offsets:
  chat       the LLM's own chat template; each assistant turn is found by rendering the
             conversation up to that turn, so the mask is right for any template (ChatML,
             Llama, ...) without per-template code
  vicuna_v1  LLaVA's `conv_vicuna_v1` (llava/conversation.py), for tokenizers without a chat
             template (Vicuna-1.5, the LLM of the paper's Table 1): system line, " USER: " /
             " ASSISTANT: " turns, each answer closed by EOS; loss on each answer and its EOS
             (LLaVA's preprocess_v1)
  plain      LLaVA-1.5's stage 1 (preprocess_plain): the image, the caption, "\n"; loss on
             the caption and "\n". Only for compressors that read no question: QueCC's stage 1
             keeps the human turn (the release pretrains with `v1`)
Sequences start with BOS when the tokenizer adds one by default (Llama, Vicuna, Mistral; Qwen
adds none), as LLaVA's tokenizer_image_token does; never two.
"""
import math
import os
from contextlib import nullcontext

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

try:  # in a model folder, for the processor (modeling_vlm.py explains)
    from .constants import IGNORE, IMAGE_SLOT, IMAGE_TOKEN
    from .llava_data import ROLES, BadSamples, record_name, trained_turns
except ImportError:
    from constants import IGNORE, IMAGE_SLOT, IMAGE_TOKEN
    from llava_data import ROLES, BadSamples, record_name, trained_turns
TEMPLATES = ("chat", "vicuna_v1", "plain")
# LLaVA llava/conversation.py, conv_vicuna_v1 (docs/sources.md): "user", where the older
# conv_llava_v1, which LLaVA-1.5 does not use, says "human"
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")


# ---------------------------------------------------------------- images

def to_rgb(image, background):
    """Any PIL mode -> RGB. Transparency is composited on `background` (not turned black),
    16-bit and float greyscale are rescaled to 8 bits."""
    if image.mode in ("I", "I;16", "I;16B", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        low, high = pixels.min(), pixels.max()
        image = Image.fromarray(((pixels - low) / max(high - low, 1e-12) * 255).astype(np.uint8))
    if image.mode == "P" or image.mode == "LA" or "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        canvas = Image.new("RGB", image.size, background)
        canvas.paste(image, mask=image.getchannel("A"))
        return canvas
    return image.convert("RGB")


def pad_to_square(image, background):
    """LLaVA-1.5's 'pad' aspect ratio: centre the image on a square of the mean colour."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def load_image(source, image_processor, aspect="pad"):
    """A file path or a PIL image -> pixel tensor (3, H, W). aspect "pad": padded to square with
    the processor's mean colour (LLaVA-1.5 stage 2, image_aspect_ratio pad); "crop": the
    processor's own resize of the short side and centre crop (LLaVA-1.5's pretrain.sh)."""
    background = tuple(int(255 * m) for m in image_processor.image_mean)
    with nullcontext(source) if isinstance(source, Image.Image) else Image.open(source) as image:
        image = to_rgb(image, background)
        if aspect == "pad":
            image = pad_to_square(image, background)
    return image_processor(images=image, return_tensors="pt")["pixel_values"][0]


# ---------------------------------------------------------------- text

def to_messages(turns, image_first=True):
    """LLaVA turns -> chat messages (a leading gpt turn dropped: llava_data.trained_turns). The
    image goes where LLaVA puts it (start of the first human turn), or after the question with
    image_first=False. Also returns the question text: the first human turn without the image,
    QueCC's query."""
    messages, question = [], None
    for turn in trained_turns(turns):
        text = turn["value"]
        if IMAGE_TOKEN in text or (question is None and turn["from"] == "human"):
            has_image = IMAGE_TOKEN in text
            text = text.replace(IMAGE_TOKEN, "").strip()
            if question is None and turn["from"] == "human":
                question = text
            if has_image:
                text = f"{IMAGE_TOKEN}\n{text}" if image_first else f"{text}\n{IMAGE_TOKEN}"
        messages.append({"role": ROLES[turn["from"]], "content": text})
    return messages, question or ""


def assistant_spans(tokenizer, messages):
    """Character spans of each assistant turn in the rendered conversation: the turn's
    text plus the template's end-of-turn marker (so the model learns to stop)."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        with_turn = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False).rstrip()
        if not (with_turn.startswith(prompt) and full.startswith(with_turn)):
            raise ValueError("the chat template does not render conversations prefix by prefix; "
                             "labels cannot be placed")
        spans.append((len(prompt), len(with_turn)))
    return full, spans


def choose_template(requested, tokenizer, text_free_stage1=False):
    """--conv-template: 'auto' is LLaVA-1.5's choice: `plain` for stage 1 of a compressor that
    reads no question, else the LLM's own chat template, else `vicuna_v1`."""
    if requested == "chat" and not tokenizer.chat_template:
        raise ValueError("--conv-template chat: the tokenizer has no chat template; use vicuna_v1 or auto")
    if requested != "auto":
        return requested
    if text_free_stage1:
        return "plain"
    return "chat" if tokenizer.chat_template else "vicuna_v1"


def render(tokenizer, messages, template, generation=False):
    """Messages in `template` -> (text, character spans that carry loss). generation=True: the
    prompt for the next assistant turn, as LLaVA's get_prompt renders it (no spans)."""
    if template == "chat":
        if generation:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), []
        return assistant_spans(tokenizer, messages)
    if template == "plain":
        if generation:  # get_prompt's PLAIN style: the first message and its separator
            return messages[0]["content"] + "\n", []
        if [m["role"] for m in messages] != ["user", "assistant"] or IMAGE_TOKEN not in messages[0]["content"]:
            raise ValueError("the plain template (stage 1) takes one human turn with the image and one answer")
        text = IMAGE_TOKEN + messages[1]["content"] + "\n"  # the question is dropped, as in preprocess_plain
        return text, [(len(IMAGE_TOKEN), len(text))]
    if template != "vicuna_v1":
        raise ValueError(f"unknown conversation template {template!r}; choose from {', '.join(TEMPLATES)}")
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else VICUNA_SYSTEM
    text, spans = system + " ", []
    for message in messages:
        if message["role"] == "user":
            text += "USER: " + message["content"] + " "
        elif message["role"] == "assistant":
            # the span starts at the space after "ASSISTANT:": LLaVA's preprocess_v1 labels the
            # token holding it (SentencePiece's "▁word"); EOS is LLaVA's sep2 "</s>" on Llama
            text += "ASSISTANT:"
            spans.append((len(text), len(text) + 1 + len(message["content"]) + len(tokenizer.eos_token)))
            text += " " + message["content"] + tokenizer.eos_token
    return (text + "ASSISTANT:", []) if generation else (text, spans)


def leading_bos(tokenizer):
    """[BOS id] for tokenizers that start every text with BOS by default (Llama, Vicuna,
    Mistral), [] for the others (Qwen)."""
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else []


def encode_with_image(tokenizer, text, num_visual_tokens):
    """Tokenize text, expanding the image marker into num_visual_tokens IMAGE_SLOT ids, with BOS
    first if the tokenizer adds one (not twice when the template wrote it).
    -> (ids, character offsets of each id)"""
    ids, offsets, position = [], [], 0
    for k, piece in enumerate(text.split(IMAGE_TOKEN)):
        if k:
            ids += [IMAGE_SLOT] * num_visual_tokens
            offsets += [(position, position)] * num_visual_tokens
            position += len(IMAGE_TOKEN)
        encoded = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
        ids += encoded["input_ids"]
        offsets += [(position + a, position + b) for a, b in encoded["offset_mapping"]]
        position += len(piece)
    bos = leading_bos(tokenizer)
    if bos and ids[:1] != bos:
        ids, offsets = bos + ids, [(0, 0)] + offsets
    return ids, offsets


def query_ids(tokenizer, question):
    """QueCC's question, tokenized with the tokenizer's defaults as in the release (Llama: BOS
    first); text-only samples ask about the word "image"."""
    return tokenizer(question or "image")["input_ids"]


def span_labels(ids, offsets, spans):
    """ids -> labels: a token keeps its id where its characters (a, b) overlap a span, else IGNORE.
    One pass: tokens come in text order and the spans are sorted and disjoint. A token of no
    width (BOS, image slots) is never labelled."""
    labels, k = [], 0
    for token, (a, b) in zip(ids, offsets):
        while k < len(spans) and spans[k][1] <= a:  # spans that end before this token starts
            k += 1
        labels.append(token if k < len(spans) and spans[k][0] < b and a < b else IGNORE)
    return labels


def tokenize(tokenizer, turns, num_visual_tokens, max_length, image_first=True, template="chat"):
    """-> dict(input_ids, labels, query_ids). Only assistant turns carry labels. Truncation
    to max_length never cuts the image span apart: if it would, the sample is refused."""
    messages, question = to_messages(turns, image_first)
    text, spans = render(tokenizer, messages, template)
    ids, offsets = encode_with_image(tokenizer, text, num_visual_tokens)
    labels = span_labels(ids, offsets, spans)
    if len(ids) > max_length:
        if IMAGE_SLOT in ids and ids.index(IMAGE_SLOT) + num_visual_tokens > max_length:
            raise ValueError(f"--max-length {max_length} would cut the image span "
                             f"(it ends at token {ids.index(IMAGE_SLOT) + num_visual_tokens})")
        ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE for label in labels):
            raise ValueError(f"--max-length {max_length} cuts every answer token: nothing to learn from")
    return dict(input_ids=ids, labels=labels, query_ids=query_ids(tokenizer, question)[:max_length])


def prompt(tokenizer, question, num_visual_tokens, image_first=True, with_image=True, template="chat"):
    """An inference prompt: one user turn (image + question) and the template's generation
    prompt. -> dict(input_ids, labels, query_ids) like tokenize(), with no label."""
    text = f"{IMAGE_TOKEN}\n{question}" if with_image else question
    messages, query = to_messages([{"from": "human", "value": text}], image_first)
    rendered, _ = render(tokenizer, messages, template, generation=True)
    ids, _ = encode_with_image(tokenizer, rendered, num_visual_tokens)
    return dict(input_ids=ids, labels=[IGNORE] * len(ids), query_ids=query_ids(tokenizer, query))


# ---------------------------------------------------------------- dataset and batches

class SupervisedDataset(Dataset):
    """Validated records -> tokenized samples with pixel values (None for text-only). With a
    feature cache (features.FeatureCache), image samples carry the frozen tower's cached
    outputs as "features" = (patches, multi_level) instead of pixel values."""

    def __init__(self, records, path, image_folder, tokenizer, image_processor, num_visual_tokens,
                 max_length, image_first=True, skip_bad=False, feature_cache=None, template="chat", aspect="pad"):
        self.records, self.path, self.image_folder = records, path, image_folder
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.num_visual_tokens, self.max_length = num_visual_tokens, max_length
        self.image_first, self.bad = image_first, BadSamples(skip_bad)
        self.feature_cache = feature_cache
        self.template, self.aspect = template, aspect

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        record = self.records[index]
        try:
            sample = tokenize(self.tokenizer, record["conversations"], self.num_visual_tokens,
                              self.max_length, self.image_first, self.template)
            sample["pixel_values"] = None
            if "image" in record:
                image = os.path.join(self.image_folder, record["image"])
                if self.feature_cache is not None:
                    sample["features"] = self.feature_cache.load(image)
                else:
                    sample["pixel_values"] = load_image(image, self.image_processor, self.aspect)
        except Exception as e:  # skipped: collate drops it; the loss is normalised by label tokens anyway
            self.bad.reject(record_name(self.path, index, record), e, cause=e)
            return None
        return sample


def pad(sequences, value, left=False):
    width = max(len(s) for s in sequences)
    return torch.tensor([[value] * (width - len(s)) * left + list(s) + [value] * (width - len(s)) * (not left)
                         for s in sequences], dtype=torch.long)


def to_device(batch, device):
    """A collated batch on `device`: its tensors, and the tensors of a tuple entry (cached features)."""
    def move(value):
        return tuple(None if v is None else v.to(device) for v in value) if isinstance(value, tuple) else value.to(device)
    return {key: move(value) for key, value in batch.items()}


def has_image(sample):
    return sample["pixel_values"] is not None or sample.get("features") is not None


def taken(samples):
    """The samples without those SupervisedDataset skipped (None: llava_data.BadSamples)."""
    return [s for s in samples if s is not None]


def collate(samples, pad_id, left=False):
    """Padded batch: right-padded for training, left-padded (left=True) for generation, so
    every prompt ends at the last column. pixel_values stacks only the samples that have an
    image (has_image), in batch order, which is the order their IMAGE_SLOT positions appear in.
    Samples from a feature cache give instead features = (patches, multi_level or None),
    stacked the same way: VLM.forward and vlm.generate take it in place of pixel_values."""
    # A micro-batch whose every sample was skipped (--skip-bad-samples) still runs, as one pad
    # token without label or image: FSDP ranks must all run the model alike.
    samples = taken(samples) or [dict(input_ids=[pad_id], labels=[IGNORE], query_ids=[pad_id], pixel_values=None)]
    batch = dict(input_ids=pad([s["input_ids"] for s in samples], pad_id, left),
                 labels=pad([s["labels"] for s in samples], IGNORE, left),
                 attention_mask=pad([[1] * len(s["input_ids"]) for s in samples], 0, left))
    return dict(batch, **per_sample(samples, pad_id))


def per_sample(samples, pad_id):
    """What stays one per sample however the tokens are laid out: QueCC's question, whether an
    image comes, and the images (or cached features) of those that have one, in sample order."""
    images = [s for s in samples if has_image(s)]
    # Every sample carries its question, text-only ones too: under FSDP every rank must run the
    # (sharded) LLM the same number of times, so the question pass cannot depend on the batch.
    fields = dict(query_ids=pad([s["query_ids"] for s in samples], pad_id),
                  query_mask=pad([[1] * len(s["query_ids"]) for s in samples], 0),
                  has_image=torch.tensor([has_image(s) for s in samples]))
    if images and images[0].get("features") is not None:
        patches, multi_level = zip(*(s["features"] for s in images))
        fields["features"] = (torch.stack(patches), None if multi_level[0] is None else torch.stack(multi_level))
    elif images:
        fields["pixel_values"] = torch.stack([s["pixel_values"] for s in images])
    return fields


# ---------------------------------------------------------------- packing (--packing)

def pack(lengths, max_length, rows=1):
    """Whole samples into rows of at most max_length tokens, at least `rows` rows (fewer only when
    there are fewer samples): -> rows of sample indices, the longest row first. Longest sample
    first, each into the row holding the fewest tokens (LPT), over the fewest rows that take them
    all: the rows come out nearly equally long, so padding them to the longest wastes little."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # ties in index order: deterministic
    for count in range(min(len(lengths), max(rows, math.ceil(sum(lengths) / max_length))), len(lengths) + 1):
        rows_of, loads = [[] for _ in range(count)], [0] * count
        for i in order:
            emptiest = loads.index(min(loads))
            if loads[emptiest] + lengths[i] > max_length:
                break
            rows_of[emptiest].append(i)
            loads[emptiest] += lengths[i]
        else:
            return [rows_of[r] for r in sorted(range(count), key=lambda r: -loads[r])]
    raise ValueError(f"a sample of {max(lengths)} tokens does not fit a row of --max-length {max_length}")


def collate_packed(samples, pad_id, max_length, micro_batches):
    """A rank's share of one step -> its `micro_batches` micro-batches, packed (pack): every
    micro-batch gets rows of similar length, so every rank runs the model `micro_batches` times
    whatever the lengths (FSDP). A micro-batch left without a row (only when skipped samples leave
    fewer samples than micro-batches) runs as collate's one pad token."""
    samples = taken(samples)
    rows = pack([len(s["input_ids"]) for s in samples], max_length, micro_batches)
    rows = [[samples[i] for i in row] for row in rows]
    share, extra = divmod(len(rows), micro_batches)
    bounds = [k * share + min(k, extra) for k in range(micro_batches + 1)]
    return [collate_rows(rows[a:b], pad_id) if b > a else collate([], pad_id) for a, b in zip(bounds, bounds[1:])]


def collate_rows(rows, pad_id):
    """Rows of samples -> a right-padded batch of the rows, each sample's tokens one after another.
    position_ids restart at 0 with every sample, and at the padding after a row's last sample (a
    block of its own): VLM.forward attends within each sample only. A sample's first label is
    dropped: in a row the token before it is another sample's last (alone, nothing predicts it
    either). attention_mask marks the real tokens; the per-sample fields (question, images) are in
    row-major order, the order of the IMAGE_SLOT positions."""
    ids = [[t for s in row for t in s["input_ids"]] for row in rows]
    labels = [[t for s in row for t in [IGNORE] + s["labels"][1:]] for row in rows]
    positions = [[p for s in row for p in range(len(s["input_ids"]))] for row in rows]
    width = max(len(row) for row in ids)
    batch = dict(input_ids=pad(ids, pad_id), labels=pad(labels, IGNORE),
                 attention_mask=pad([[1] * len(row) for row in ids], 0),
                 position_ids=torch.tensor([row + list(range(width - len(row))) for row in positions]))
    return dict(batch, **per_sample([s for row in rows for s in row], pad_id))
