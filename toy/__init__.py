"""The built-in toy world: tiny models and a local tokenizer, nothing downloaded.

`--llm toy-xxs` ... `toy-l` (`toy` is toy-s) is a Qwen2-architecture LLM pretrained on the toy
world's language (toy/pretrain.py), `--vision toy` a CLIP vision tower with the real 24x24 patch
grid (96 px images, 4 px patches, so every real token count works), pretrained on the toy images.
The checkpoints of toy-xxs, toy-xs, toy-s and the tower ship in toy/pretrained/; toy-m and toy-l
are pretrained on first use (the demo does it) into cache/pretrained/. The vocabulary of the
world (toy/make_data.py) lives here because the tokenizer is trained on it.
"""
import functools
import hashlib
import json
import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel,
                          PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM)

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle", "cross"]
# the cells of a 3x3 grid, row by row
POSITIONS = ["top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right"]
NUMBERS = ["zero", "one", "two", "three", "four", "five"]
WORDS = ["cat", "dog", "sun", "box", "car", "map", "pen", "cup", "hat", "key", "bus", "egg"]
RELATIONS = ["left of", "right of", "above", "below"]

# Qwen's ChatML template, without Qwen's default system prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# (hidden, layers, heads, kv heads, mlp): 0.014M, 0.043M, 0.28M, 1.05M and 8.0M parameters (vocabulary 512)
LLM_SIZES = {
    "toy-xxs": (16, 2, 2, 1, 32),
    "toy-xs": (32, 2, 4, 2, 64),
    "toy-s": (64, 4, 4, 2, 256),
    "toy-m": (128, 4, 4, 2, 512),
    "toy-l": (256, 8, 8, 4, 1024),
}
LLM_SIZES["toy"] = LLM_SIZES["toy-s"]
PRETRAINED_LLMS = ("toy-xxs", "toy-xs", "toy-s", "toy-m", "toy-l")
VISION = "vision"  # the tower's folder beside the LLMs'

VISION_IMAGE_SIZE, VISION_PATCH = 96, 4  # 96 / 4 = 24 patches a side, as CLIP-L/336
SEED = 1234
HERE = os.path.dirname(os.path.abspath(__file__))
SHIPPED = os.path.join(HERE, "pretrained")  # in git: what the default grid uses
CACHED = os.path.join(os.path.dirname(HERE), "cache", "pretrained")  # made on first use, out of git
SETTINGS_FILE = "pretrain_settings.json"


def is_toy(name):
    return name in LLM_SIZES


def canonical(name):
    return "toy-s" if name == "toy" else name


def _tokenizer_corpus():
    sentences = [
        "Describe the image briefly. What is written in the image? How many shapes are there?",
        "Is there a shape in the image? Answer the question using a single word or phrase.",
        "Answer with the option's letter from the given choices directly. yes no A B C D",
        "What colour is the shape? What colour are the shapes? What shape is the object?",
        "What shape is the red object? How many shapes are not red? Are there more circles than squares?",
        "What colour is the shape left of the circle? What shape is above the square? right of below",
        "There is a picture of some shapes with the word 0 1 2 3 4 5 6 7 8 9 and and in the at the.",
    ]
    words = COLOURS + SHAPES + POSITIONS + NUMBERS + WORDS + ["yes", "no"]
    # each word alone too: an answer starts its turn without a leading space, and should be one
    # token, as common words are in a real LLM's vocabulary (not spelled out letter by letter)
    return sentences + [" ".join(words)] * 4 + words * 4 + [w + ("es" if w.endswith("s") else "s") for w in SHAPES]


def build_tokenizer():
    """A byte-level BPE (any text encodes) trained in milliseconds on the toy world's words."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tokenizer.train_from_iterator(_tokenizer_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE)


@functools.cache  # every load and every settings check asks; the tokenizer is code, fixed per process
def tokenizer_hash():
    """The tokenizer's vocabulary and merges: a pretrained toy LLM reads token ids, so a changed
    tokenizer makes its checkpoint stale."""
    return hashlib.sha1(build_tokenizer().backend_tokenizer.to_str().encode()).hexdigest()[:16]


def build_llm(name, vocab_size):
    """A random-init toy LLM (the starting point of pretraining; tests and benches use it as is)."""
    hidden, layers, heads, kv_heads, mlp = LLM_SIZES[name]
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads,
                         intermediate_size=mlp, max_position_embeddings=4096,
                         tie_word_embeddings=True, eos_token_id=2, pad_token_id=0,
                         # weights ~ 1/sqrt(width), not the 0.02 tuned for 768+ wide models: at
                         # width 16-256, 0.02 starts attention so flat that a toy LLM needs thousands
                         # of steps to learn to read the visual tokens (docs/toy_world.md)
                         initializer_range=hidden ** -0.5)
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        return Qwen2ForCausalLM(config)


def vision_config():
    # width 32: QueCC's key and value MLPs read all 576 patches of four of its layers, whatever V
    # is, so the tower's width sets most of a small toy VLM's step (docs/toy_world.md)
    return CLIPVisionConfig(image_size=VISION_IMAGE_SIZE, patch_size=VISION_PATCH, hidden_size=32,
                            intermediate_size=64, num_hidden_layers=6, num_attention_heads=2)


def build_vision():
    """A random-init toy vision tower (the starting point of its pretraining)."""
    with torch.random.fork_rng():
        torch.manual_seed(SEED + 1)
        return CLIPVisionModel(vision_config())


def build_image_processor():
    size = VISION_IMAGE_SIZE
    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def pretrained_dir(name):
    """The folder holding a pretrained toy model (an LLM preset or VISION) made with today's
    settings (toy/pretrain.py), shipped or cached; None if there is none."""
    from toy import pretrain  # its settings name the world's generator, which imports this module
    wanted = pretrain.settings(canonical(name))
    return next((path for path in (os.path.join(root, canonical(name)) for root in (SHIPPED, CACHED))
                 if made_with(path, wanted)), None)


def made_with(folder, settings):
    """Does folder hold a pretrained model made with these settings (toy/pretrain.py writes them last)?"""
    path = os.path.join(folder, SETTINGS_FILE)
    return os.path.exists(path) and json.load(open(path)) == settings


def _pretrained(name):
    path = pretrained_dir(name)
    if path is None:
        raise SystemExit(f"error: the toy model {name} has no pretrained checkpoint made with today's settings in "
                         f"{SHIPPED} or {CACHED}; make it with: python -m toy.pretrain --models {canonical(name)}")
    return path


def load_llm(name):
    """A pretrained toy preset (PRETRAINED_LLMS), or a random-init one for other presets (benches)."""
    tokenizer = build_tokenizer()
    if canonical(name) not in PRETRAINED_LLMS:
        return build_llm(name, len(tokenizer)), tokenizer
    return Qwen2ForCausalLM.from_pretrained(_pretrained(name), dtype=torch.float32), tokenizer


def load_vision():
    return CLIPVisionModel.from_pretrained(_pretrained(VISION), dtype=torch.float32), build_image_processor()


def save_toy_models(directory, llm="toy"):
    """Write a toy LLM+tokenizer to DIR/llm and the toy vision tower to DIR/vision as the presets load
    them, laid out exactly as a hub checkpoint, so tests exercise the `--llm DIR` loading path."""
    model, tokenizer = load_llm(llm)
    model.save_pretrained(f"{directory}/llm")
    tokenizer.save_pretrained(f"{directory}/llm")
    vision, image_processor = load_vision()
    vision.save_pretrained(f"{directory}/vision")
    image_processor.save_pretrained(f"{directory}/vision")
    return f"{directory}/llm", f"{directory}/vision"
