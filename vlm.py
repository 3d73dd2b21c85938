"""Model assembly: a frozen CLIP vision tower, the projector (compressors.py) and a causal LLM.

The token sequence carries IMAGE_SLOT ids where visual tokens go; a hook on
the LLM's token embedding swaps in the projector's output at exactly those
positions. There is no per-sample splicing loop: a batch mixing text-only and
image samples is one masked scatter.
"""
import json
import os
from contextlib import contextmanager
import shutil
import tempfile
import warnings

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, CLIPImageProcessorPil,
                          CLIPVisionConfig, CLIPVisionModel)

import toy
from constants import IGNORE, IMAGE_SLOT
from compressors import Projector
from quecc import key_layers

# VLM.forward asks for hidden states; under FSDP the first (the embedding output) comes back as a
# view, and FSDP warns that an in-place op on it would skip its hook. Nothing writes into it.
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

SELECT_LAYER = -2  # LLaVA-1.5: second-to-last layer of CLIP (--mm_vision_select_layer; docs/sources.md)
CONFIG_FILE, PROJECTOR_FILE, LLM_DIR = "vlm_config.json", "projector.safetensors", "llm"


def load_tokenizer(name):
    """A hub name, a local directory, or a toy preset -> tokenizer with a pad token. One without
    a chat template is fine: conversation.py renders LLaVA's vicuna_v1 for it (Vicuna-1.5)."""
    if toy.is_toy(name):
        return toy.build_tokenizer()
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
        tokenizer = toy.build_tokenizer()
        llm = toy.build_llm(name, len(tokenizer))
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
        return toy.build_vision(), toy.build_image_processor()
    return CLIPVisionModel.from_pretrained(name), CLIPImageProcessorPil.from_pretrained(name)


def vision_grid(name):
    """Patches per side of a vision tower, from its config alone (no weights loaded)."""
    config = toy.vision_config() if name == "toy" else CLIPVisionConfig.from_pretrained(name)
    return config.image_size // config.patch_size


class VLM(nn.Module):
    def __init__(self, llm, vision, projector, config):
        super().__init__()
        self.llm, self.vision, self.projector, self.config = llm, vision, projector, config
        self.vision.requires_grad_(False)  # frozen in both stages: never trained, never in the optimizer
        self._pending = None
        llm.get_input_embeddings().register_forward_hook(self._insert_visual)

    @torch.no_grad()
    def encode_images(self, pixel_values):
        """-> patches (B, grid^2, C) of the select layer and, if the projector uses them,
        the key layers concatenated on channels (B, grid^2, 4C). CLS is dropped."""
        self.vision.eval()
        states = self.vision(pixel_values.to(self.vision.dtype), output_hidden_states=True).hidden_states
        patches = states[self.config["select_layer"]][:, 1:]
        multi_level = None
        if self.projector.needs_multi_level:
            multi_level = torch.cat([states[i][:, 1:] for i in self.config["key_layers"]], dim=-1)
        return patches, multi_level

    @torch.no_grad()
    def question_embedding(self, query_ids, query_mask):
        """The LLM's final hidden state (after its last norm) at the last token of the question,
        no gradient, as in the paper. Called through the whole LLM, not its decoder alone, so
        FSDP gathers the weights; logits_to_keep=1 leaves the LM head nearly idle."""
        out = self.llm(input_ids=query_ids, attention_mask=query_mask, output_hidden_states=True,
                       logits_to_keep=1)
        last = query_mask.sum(1) - 1  # right-padded
        return out.hidden_states[-1][torch.arange(len(last)), last]

    def visual_tokens(self, pixel_values, question=None, features=None):
        """-> (B, V, d_llm). question: (B, d_llm) for quecc. features: precomputed
        encode_images output (a feature cache) instead of pixel_values."""
        patches, multi_level = features if features is not None else self.encode_images(pixel_values)
        dtype = next(self.projector.parameters()).dtype
        cast = (lambda t: None if t is None else t.to(dtype))
        return self.projector(cast(patches), cast(multi_level), cast(question))

    def _insert_visual(self, embedding, inputs, output):
        """Forward hook on the LLM's token embedding: writes the pending visual tokens into
        the IMAGE_SLOT positions. It runs inside the LLM's own forward, so under FSDP the
        (sharded, maybe tied) embedding is already gathered. One-shot, so generation's later
        steps, which embed only new tokens, are left alone."""
        if self._pending is None:
            return output
        slots, visual = self._pending
        self._pending = None
        return output.masked_scatter(slots[..., None], visual.to(output.dtype))

    @contextmanager
    def armed(self, input_ids, visual):
        """Arm the embedding hook with `visual` (B_img, V, d) for the LLM forward run inside the
        `with`: -> ids the embedding can look up. Disarmed on exit, whatever happened."""
        slots = input_ids == IMAGE_SLOT
        self._pending = (slots, visual) if visual is not None else None
        try:
            yield input_ids.masked_fill(slots, 0)
        finally:
            self._pending = None

    @contextmanager
    def inputs(self, input_ids, query_ids, query_mask, has_image, pixel_values=None, features=None):
        """The one way in, for training and generation alike: the question embedding and visual
        tokens of a batch, then the ids to run the LLM on, the hook armed inside the `with`."""
        question = visual = None
        if self.projector.needs_question:  # every sample, so FSDP ranks run the LLM alike
            question = self.question_embedding(query_ids, query_mask)[has_image]
        if has_image.any():
            visual = self.visual_tokens(pixel_values, question, features)
        with self.armed(input_ids, visual) as ids:
            yield ids

    def forward(self, input_ids, attention_mask, labels, query_ids, query_mask, has_image,
                pixel_values=None, features=None):
        """-> (sum of token losses, number of label tokens). The caller divides, so the loss
        can be normalised over a whole global batch, however it is split.
        Logits only where a label is: in stage 2 at V = 576 about six positions in seven are
        visual or prompt tokens, and the head (vocabulary x width) is a third of a 0.5B LLM."""
        # Through the whole LLM, so FSDP gathers its root unit (embeddings, head), which fully_shard
        # leaves gathered until backward (tests/test_label_loss.py checks it on 2 processes): the
        # final hidden states after the last norm, its own head on one position only. The head
        # runs below, on the label positions.
        with self.inputs(input_ids, query_ids, query_mask, has_image, pixel_values, features) as ids:
            hidden = self.llm(input_ids=ids, attention_mask=attention_mask, output_hidden_states=True,
                              logits_to_keep=1).hidden_states[-1]
        targets = labels[:, 1:]
        at_label = targets != IGNORE  # position t predicts label t + 1
        loss = label_loss(self.llm.get_output_embeddings(), hidden[:, :-1][at_label], targets[at_label])
        return loss, at_label.sum()


LOGITS_PER_CHUNK = 2 ** 25  # logits held at once by label_loss: 128 MiB in fp32, whatever the vocabulary


def label_loss(head, hidden, targets):
    """Sum of the cross-entropies of head(hidden) (N, vocabulary) against targets (N,), computed
    in chunks of rows. With more than one chunk, each chunk's logits are freed after its forward
    and recomputed in backward (checkpoint), so at most one chunk of logits exists at a time.
    N = 0 still gives a loss in the graph: every FSDP rank runs the same backward."""
    rows = max(1, LOGITS_PER_CHUNK // head.out_features)
    chunks = list(zip(hidden.split(rows), targets.split(rows)))

    def chunk_loss(h, t):
        return nn.functional.cross_entropy(head(h).float(), t, reduction="sum")
    if len(chunks) == 1:
        return chunk_loss(*chunks[0])
    return sum(checkpoint(chunk_loss, h, t, use_reentrant=False) for h, t in chunks)


@torch.no_grad()
def generate(model, tokenizer, batch, max_new_tokens=128):
    """Greedy answers (LLaVA-1.5 evaluation: temperature 0, one beam) for a left-padded batch
    from conversation.collate(..., left=True). -> list of strings."""
    with model.inputs(batch["input_ids"], batch["query_ids"], batch["query_mask"], batch["has_image"],
                      batch.get("pixel_values"), batch.get("features")) as input_ids:
        out = model.llm.generate(input_ids=input_ids, attention_mask=batch["attention_mask"], do_sample=False,
                                 num_beams=1, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    return [t.strip() for t in tokenizer.batch_decode(out[:, input_ids.shape[1]:], skip_special_tokens=True)]


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
    model.config["llm_dtype"] = str(stored).removeprefix("torch.")
    return model, tokenizer, image_processor


def assemble(llm, vision, tokens, compressor, llm_name, vision_name):
    """A VLM around models already built (the benches build theirs from configs alone)."""
    vcfg = vision.config
    grid = vcfg.image_size // vcfg.patch_size
    config = dict(llm=loadable(llm_name), vision=loadable(vision_name), tokens=tokens, compressor=compressor, grid=grid,
                  select_layer=SELECT_LAYER, key_layers=key_layers(vcfg.num_hidden_layers),
                  vision_width=vcfg.hidden_size, llm_width=llm.config.hidden_size)
    projector = Projector(compressor, tokens, grid, vcfg.hidden_size, llm.config.hidden_size,
                          len(config["key_layers"]))
    return VLM(llm, vision, projector, config)


def loadable(name):
    """A model's name as it loads from any working directory: a local path made absolute (as typed,
    a relative one breaks elsewhere), a hub name or toy preset as it is."""
    return name if toy.is_toy(name) or not os.path.exists(name) else os.path.abspath(name)


def model_name(name):
    """What names one model across machines: the last path component, so a hub name and its
    downloaded directory are one model; but the whole path for an output's LLM_DIR, which every
    stage-2 output has."""
    name = os.path.normpath(name)
    return os.path.abspath(name) if os.path.basename(name) == LLM_DIR else os.path.basename(name)


class ProjectorMismatch(ValueError):
    """A projector built for another model; the message names its directory."""


def load_projector(model, directory):
    """Stage 2 starts from the stage-1 projector; refuse one built for another model."""
    with open(os.path.join(directory, CONFIG_FILE)) as f:
        saved = json.load(f)
    for key in ("tokens", "compressor", "grid", "vision_width", "llm_width", "llm", "vision"):
        ours, theirs = model.config[key], saved[key]
        if key in ("llm", "vision") and model_name(ours) != model_name(theirs):
            raise ProjectorMismatch(f"{directory}: projector was trained for --{key} {theirs}, this run has --{key} {ours}")
        if key not in ("llm", "vision") and ours != theirs:
            raise ProjectorMismatch(f"{directory}: projector was trained with {key}={theirs}, "
                                    f"this run has {key}={ours}")
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
    """The output directory: vlm_config.json, projector.safetensors and, unless only the
    projector was trained, the LLM and tokenizer in Hugging Face format under llm/.
    llm_state: a full (gathered) state dict when the live LLM is sharded.

    The LLM is saved in the dtype its checkpoint came in (config llm_dtype: bf16 for Qwen1.5, fp16
    for Vicuna-1.5, fp32 for the toy presets), though it trained in fp32: the output then stands in
    for the model it started from, at that model's size on disk (LLaVA saves bf16). The fp32
    weights and optimizer states of a run live on in its checkpoints/ (--save-every). The
    projector, small, is saved in fp32.

    Everything is written to DIR/.saving first and moved into place with vlm_config.json
    last: a directory with vlm_config.json is complete, and a kill mid-save leaves none."""
    staging = os.path.join(directory, ".saving")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    config = dict(model.config, **(extra_config or {}))
    if save_llm:
        dtype = config.setdefault("llm_dtype", "float32")
        state = model.llm.state_dict() if llm_state is None else llm_state
        model.llm.save_pretrained(os.path.join(staging, LLM_DIR), state_dict=cast_state(state, getattr(torch, dtype)))
        llm_config = os.path.join(staging, LLM_DIR, "config.json")  # it records the live model's fp32
        with open(llm_config) as f:
            saved = json.load(f)
        with open(llm_config, "w") as f:
            json.dump(dict(saved, dtype=dtype), f, indent=2)
        config["llm_dir"] = LLM_DIR
    tokenizer.save_pretrained(os.path.join(staging, LLM_DIR if save_llm else "tokenizer"))
    state = {k: v.detach().cpu().contiguous() for k, v in model.projector.state_dict().items()}
    save_file(state, os.path.join(staging, PROJECTOR_FILE))
    with open(os.path.join(staging, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)
    if os.path.exists(os.path.join(directory, CONFIG_FILE)):
        os.remove(os.path.join(directory, CONFIG_FILE))  # an earlier output, incomplete from here on
    for name in sorted(os.listdir(staging), key=lambda n: n == CONFIG_FILE):
        target = os.path.join(directory, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(os.path.join(staging, name), target)
    os.rmdir(staging)


def load_pretrained(directory, dtype=None):
    """An output directory of 01/02 -> (VLM, tokenizer, image_processor), ready for inference."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(path):
        raise SystemExit(f"error: cannot load the model {directory}: no {CONFIG_FILE}; is this a 01/02 output directory?")
    with open(path) as f:
        config = json.load(f)
    llm_name = os.path.join(directory, config["llm_dir"]) if "llm_dir" in config else config["llm"]
    model, tokenizer, image_processor = build(llm_name, config["vision"], config["tokens"],
                                              config["compressor"], dtype)
    model.config = config
    load_projector(model, directory)
    return model, tokenizer, image_processor
