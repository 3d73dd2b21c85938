"""Models from names (a hub name, a local directory, or a toy preset), the output directories of
01/02 (save, load_pretrained) and batched greedy generation. The model itself (a frozen CLIP vision
tower, the projector of compressors.py and a causal LLM), its typed config and the loss are
modeling_vlm.py; the processor a saved model carries is processing_vlm.py.
"""
import copy
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager

import torch
from safetensors.torch import load_file, save_file
from transformers import (AddedToken, AutoConfig, AutoModelForCausalLM, AutoTokenizer, CLIPImageProcessorPil,
                          CLIPVisionConfig, CLIPVisionModel)

import toy
from constants import IMAGE_TOKEN
from modeling_vlm import VLM, VLMConfig
from processing_vlm import VLMProcessor
from quecc import key_layers

CONFIG_FILE, PROJECTOR_FILE, CARD_FILE = "config.json", "projector.safetensors", "README.md"
GENERATION_CONFIG_FILE, WEIGHT_FILES = "generation_config.json", ("model.safetensors", "model.safetensors.index.json")
# the layout before model folders (convert_model.py): vlm_config.json, and in stage 2 the LLM under llm/
LEGACY_CONFIG_FILE, LEGACY_LLM_DIR = "vlm_config.json", "llm"


def load_tokenizer(name):
    """A hub name, a local directory, or a toy preset -> tokenizer with a pad token. One without
    a chat template is fine: conversation.py renders LLaVA's vicuna_v1 for it (Vicuna-1.5)."""
    if toy.is_toy(name):
        return toy.build_tokenizer()
    if is_output(name):  # its config.json would have transformers ask to run the folder's code, then fail
        raise SystemExit(f"error: --llm {name} is an output of 01/02 (a VLM), not an LLM; give the LLM it was "
                         f"trained from: {read_config(name).llm}")
    tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def checkpoint_dtype(name):
    """The dtype an LLM's checkpoint stores its weights in (its config.json; fp32 where it says none,
    and for the toy presets): the dtype its trained version is saved in (save)."""
    if toy.is_toy(name):
        return torch.float32
    dtype = AutoConfig.from_pretrained(name).dtype or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def load_llm(name, dtype=None, quantization_config=None):
    """A hub name, a local directory, or a toy preset -> (llm, tokenizer). dtype None: the dtype
    the checkpoint stores (transformers' "auto"); training asks for fp32 (train.precision)."""
    if toy.is_toy(name):
        llm, tokenizer = toy.load_llm(name)
        if quantization_config is None:
            return llm, tokenizer
        # quantization happens while loading: route the toy through a directory, as a hub model
        with tempfile.TemporaryDirectory() as directory:
            llm.save_pretrained(directory)
            return AutoModelForCausalLM.from_pretrained(directory, quantization_config=quantization_config), tokenizer
    tokenizer = load_tokenizer(name)
    # a 4-bit model is quantized as it loads, straight onto the GPU it will train on
    device_map = {"": torch.cuda.current_device()} if quantization_config and torch.cuda.is_available() else None
    llm = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, quantization_config=quantization_config,
                                               device_map=device_map)
    return llm, tokenizer


def load_vision(name):
    """A hub name, a local directory, or 'toy' -> (CLIP vision model, image processor)."""
    if name == "toy":
        return toy.load_vision()
    return CLIPVisionModel.from_pretrained(name), CLIPImageProcessorPil.from_pretrained(name)


def vision_grid(name):
    """Patches per side of a vision tower, from its config alone (no weights loaded)."""
    config = toy.vision_config() if name == "toy" else CLIPVisionConfig.from_pretrained(name)
    return config.image_size // config.patch_size


@contextmanager
def loading(what, name):
    """A model that cannot be loaded (a wrong name, no network, a gated repository, a folder that
    holds no model: Hugging Face raises OSError for each) stops with one line naming it."""
    try:
        yield
    except OSError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SystemExit(f"error: cannot load the {what} {name}: {reason}") from None



def build(llm_name, vision_name, tokens, compressor, dtype=None, quantization_config=None):
    """Everything from names -> (VLM, tokenizer, image_processor)."""
    with loading("LLM", llm_name):
        llm, tokenizer = load_llm(llm_name, dtype, quantization_config)
        stored = checkpoint_dtype(llm_name)
    with loading("vision tower", vision_name):
        vision, image_processor = load_vision(vision_name)
    model = assemble(llm, vision, tokens, compressor, llm_name, vision_name)
    model.config.llm_dtype = str(stored).removeprefix("torch.")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, image_processor


def assemble(llm, vision, tokens, compressor, llm_name, vision_name):
    """A VLM around models already built (the benches build theirs from configs alone)."""
    vcfg = vision.config
    # copies of the models' configs: the VLM's init sets the attention implementation of its sub-configs
    config = VLMConfig(llm=loadable(llm_name), vision=loadable(vision_name), tokens=tokens, compressor=compressor,
                       grid=vcfg.image_size // vcfg.patch_size, key_layers=key_layers(vcfg.num_hidden_layers),
                       vision_width=vcfg.hidden_size, llm_width=llm.config.hidden_size,
                       text_config=copy.deepcopy(llm.config), vision_config=copy.deepcopy(vcfg))
    return VLM(config, llm, vision)


def loadable(name):
    """A model's name as it loads from any working directory: a local path made absolute (as typed,
    a relative one breaks elsewhere), a hub name or toy preset as it is."""
    return name if toy.is_toy(name) or not os.path.exists(name) else os.path.abspath(name)


def model_name(name):
    """What names one model across machines: the last path component, so a hub name and its
    downloaded directory are one model; but the whole path for the llm/ of an output of the earlier
    layout, which every stage-2 output had."""
    name = os.path.normpath(name)
    return os.path.abspath(name) if os.path.basename(name) == LEGACY_LLM_DIR else os.path.basename(name)


class ProjectorMismatch(ValueError):
    """A projector built for another model; the message names its directory."""


def refuse_earlier_layout(directory):
    """An output of the layout before model folders (vlm_config.json) stops with the command that
    converts it."""
    if not os.path.exists(os.path.join(directory, CONFIG_FILE)) and os.path.exists(
            os.path.join(directory, LEGACY_CONFIG_FILE)):
        raise SystemExit(f"error: {directory} is a 01/02 output in the layout before Hugging Face model folders "
                         f"({LEGACY_CONFIG_FILE}); convert it once: python convert_model.py {directory}")


def is_output(directory):
    """A 01/02 output directory (its config.json is a VLMConfig)."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        return json.load(f).get("model_type") == VLMConfig.model_type


def read_config(directory):
    """The typed config of a 01/02 output directory."""
    refuse_earlier_layout(directory)
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(path):
        raise SystemExit(f"error: cannot load the model {directory}: no {CONFIG_FILE}; is this a 01/02 output directory?")
    if not is_output(directory):
        raise SystemExit(f"error: cannot load the model {directory}: its {CONFIG_FILE} is not a 01/02 output's")
    return VLMConfig.from_json_file(path)


def load_projector(model, directory):
    """Stage 2 starts from the stage-1 projector; refuse one built for another model."""
    saved = read_config(directory)
    for key in ("tokens", "compressor", "grid", "vision_width", "llm_width", "llm", "vision"):
        ours, theirs = getattr(model.config, key), getattr(saved, key)
        if key in ("llm", "vision") and model_name(ours) != model_name(theirs):
            raise ProjectorMismatch(f"{directory}: projector was trained for --{key} {theirs}, this run has --{key} {ours}")
        if key not in ("llm", "vision") and ours != theirs:
            raise ProjectorMismatch(f"{directory}: projector was trained with {key}={theirs}, "
                                    f"this run has {key}={ours}")
    if not os.path.exists(os.path.join(directory, PROJECTOR_FILE)):
        raise SystemExit(f"error: {directory} holds no {PROJECTOR_FILE}: a projector comes from 01_pretrain_projector.py")
    model.projector.load_state_dict(load_file(os.path.join(directory, PROJECTOR_FILE)))


def cast_state(state, dtype):
    """A state dict with its floating tensors in dtype; tensors that share storage (tied embedding
    and head) stay shared, so the checkpoint holds them once."""
    cast = {}
    for tensor in state.values():
        if tensor.data_ptr() not in cast:
            cast[tensor.data_ptr()] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return {name: cast[tensor.data_ptr()] for name, tensor in state.items()}


def save(model, tokenizer, directory, save_llm, extra_config=None, llm_state=None):
    """The output directory, its config updated with extra_config. Stage 1 (save_llm False, only the
    projector trained): config.json, projector.safetensors and the tokenizer under tokenizer/. Stage 2:
    a Hugging Face model folder that runs without this repository (write_model_folder).
    llm_state: a full (gathered) state dict when the live LLM is sharded.

    Everything is written to DIR/.saving first and moved into place with config.json last: a
    directory with config.json is complete, and a kill mid-save leaves none."""
    staging = os.path.join(directory, ".saving")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    model.config.update(extra_config or {})
    if save_llm:
        write_model_folder(model, tokenizer, staging, llm_state)
    else:
        tokenizer.save_pretrained(os.path.join(staging, "tokenizer"))
        state = {k: v.detach().cpu().contiguous() for k, v in model.projector.state_dict().items()}
        save_file(state, os.path.join(staging, PROJECTOR_FILE))
        model.config.to_json_file(os.path.join(staging, CONFIG_FILE))
    for name in (CONFIG_FILE, PROJECTOR_FILE) + WEIGHT_FILES:  # an earlier output: incomplete from here on,
        if os.path.exists(os.path.join(directory, name)):     # and none of its weights left to load
            os.remove(os.path.join(directory, name))
    for name in sorted(os.listdir(staging), key=lambda n: n == CONFIG_FILE):
        target = os.path.join(directory, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(os.path.join(staging, name), target)
    os.rmdir(staging)


def write_model_folder(model, tokenizer, directory, llm_state=None):
    """Stage 2's output: config.json (with auto_map), model.safetensors (llm.*, vision.*, projector.*),
    generation_config.json, the processor (tokenizer with an added <image> token, image processor,
    processor_config.json), the model and processor code (modeling_vlm.py, processing_vlm.py and the
    modules they import) and README.md, a model card.

    The LLM is saved in the dtype its checkpoint came in (config llm_dtype: bf16 for Qwen1.5, fp16
    for Vicuna-1.5, fp32 for the toy presets), though it trained in fp32: the output then stands in
    for the model it started from, at that model's size on disk (LLaVA saves bf16), and loads in that
    dtype (config.json's dtype). The fp32 weights and optimizer states of a run live on in its
    checkpoints/ (--save-every). The projector, small, is saved in fp32; the frozen vision tower as
    its source holds it (the live copy may be held in bf16, train.precision)."""
    config = model.config
    with loading("vision tower", config.vision):
        vision, image_processor = load_vision(config.vision)
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    config.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config.text_config = copy.deepcopy(model.llm.config)  # as it is now: LoRA merged, QLoRA dequantized
    llm_state = model.llm.state_dict() if llm_state is None else llm_state
    state = {f"llm.{k}": v for k, v in cast_state(llm_state, getattr(torch, config.llm_dtype)).items()}
    state.update({f"vision.{k}": v for k, v in vision.state_dict().items()})
    state.update({f"projector.{k}": v.detach().cpu().contiguous() for k, v in model.projector.state_dict().items()})
    model.save_pretrained(directory, state_dict=state)
    VLMProcessor(image_processor, tokenizer, config.tokens, config.conv_template, config.image_first,
                 config.image_aspect, model.projector.needs_question).save_pretrained(directory)
    path = os.path.join(directory, CONFIG_FILE)  # save_pretrained records the live model's dtype (fp32)
    with open(path) as f:
        saved = json.load(f)
    with open(path, "w") as f:
        json.dump(dict(saved, dtype=config.llm_dtype, text_config=dict(saved["text_config"], dtype=config.llm_dtype)),
                  f, indent=2)
    write_model_card(directory, config)


def write_model_card(directory, config, results=()):
    """DIR/README.md, the model card the Hub shows: what the model is, how it was trained, how to run
    it, and its scores (results: the rows of 03_evaluate.py's results.jsonl). Replaced, not written
    through: in a Hub cache it is a link to a shared file."""
    settings = config.settings or {}
    hub_name = re.fullmatch(r"[\w.-]+/[\w.-]+", config.llm) and not os.path.isdir(config.llm)
    trained = f"{config.steps} steps of {settings.get('batch_size')} samples, lr {settings.get('lr')}" \
        if config.steps else "-"
    lines = ["---", "library_name: transformers", "pipeline_tag: image-text-to-text",
             *([f"base_model: {config.llm}"] if hub_name else []), "tags: [llava, quecc, visual-token-compression]", "---",
             "", f"# {model_name(config.llm)}-{config.compressor}-v{config.tokens}", "",
             f"A LLaVA-1.5-style vision-language model: the frozen vision tower's patches, compressed by "
             f"`{config.compressor}` to V = {config.tokens} visual token{'s' * (config.tokens > 1)} per image, feed the "
             "LLM. Trained with the reference implementation of *Inference Optimal VLMs Need Only One Visual Token "
             "but Larger Models* (Li, Goyal, Semedo, Kolter, 2024).", "",
             "| | |", "|---|---|",
             f"| base LLM | `{config.llm}` (saved in {config.llm_dtype}) |",
             f"| vision tower | `{config.vision}` (frozen; layer {config.select_layer}, {config.grid}x{config.grid} patches) |",
             f"| compressor | `{config.compressor}`, V = {config.tokens} |",
             f"| prompt | template `{config.conv_template}`, image {'before' if config.image_first else 'after'} the "
             f"question, images {config.image_aspect} |",
             f"| data | `{settings.get('data', '-')}` |",
             f"| training | stage {config.stage}: {trained} |", "",
             "## Use", "", "```python",
             "from PIL import Image",
             "from transformers import AutoModelForImageTextToText, AutoProcessor",
             'folder = "."  # this folder, or its name on the Hub',
             "model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)",
             "processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)",
             'messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]',
             "prompt = processor.apply_chat_template(messages, add_generation_prompt=True)",
             'inputs = processor(images=[Image.open("photo.jpg")], text=prompt, return_tensors="pt")',
             "output = model.generate(**inputs, max_new_tokens=32, do_sample=False)",
             'print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))', "```", ""]
    if results:
        lines += ["## Scores (03_evaluate.py)", "", "| benchmark | metric | score |", "|---|---|---|"]
        lines += [f"| {r['benchmark']} | {r['metric']} | {r['score']:.2f} |" for r in results]
        lines.append("")
    with open(os.path.join(directory, CARD_FILE + ".tmp"), "w") as f:
        f.write("\n".join(lines))
    os.replace(os.path.join(directory, CARD_FILE + ".tmp"), os.path.join(directory, CARD_FILE))


def is_model_folder(directory):
    """A stage-2 output (a Hugging Face model folder), not stage 1's projector."""
    return any(os.path.exists(os.path.join(directory, name)) for name in WEIGHT_FILES)


def load_pretrained(directory, dtype=None):
    """An output directory of 01/02 -> (VLM, tokenizer, image_processor), ready for inference. A
    model folder (02) loads with Hugging Face's from_pretrained, its LLM in the dtype it was saved
    in unless dtype says otherwise; a projector (01) on the LLM and tower it was trained for."""
    config = read_config(directory)
    if not is_model_folder(directory):
        model, tokenizer, image_processor = build(config.llm, config.vision, config.tokens, config.compressor, dtype)
        model.config = config
        load_projector(model, directory)
        return model, tokenizer, image_processor
    with loading("model", directory):
        model = VLM.from_pretrained(directory, dtype=dtype)
        processor = VLMProcessor.from_pretrained(directory, config=config)  # config: its tokenizer needs no auto_map
    return model, processor.tokenizer, processor.image_processor


@torch.no_grad()
def generate(model, tokenizer, batch, max_new_tokens=128, synced=False):
    """Greedy answers (LLaVA-1.5 evaluation: temperature 0, one beam) for a left-padded batch
    from conversation.collate(..., left=True). -> list of strings. synced: every process runs every
    decoding step until all are done, as the sharded LLM under FSDP needs (transformers' synced_gpus)."""
    out = model.generate(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"), batch["query_ids"],
                         batch["query_mask"], batch.get("features"), do_sample=False, num_beams=1,
                         max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, synced_gpus=synced)
    return [t.strip() for t in tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)]
