"""The VLM as a Hugging Face model: its typed config (VLMConfig) and the model (VLM: a frozen CLIP
vision tower, the projector of compressors.py and any causal LLM), training's loss and generation.

This file, processing_vlm.py and the modules they import are copied into every stage-2 output
folder as transformers custom code (config.json's auto_map), so the folder runs without this
repository: AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True). In the
folder the imports between them are relative, here top-level: hence the try/except around them
(transformers copies the files a relative import names and skips imports inside try blocks when it
checks that packages are installed).

The token sequence carries IMAGE_SLOT ids where visual tokens go; a hook on the LLM's token
embedding swaps in the projector's output at exactly those positions. There is no per-sample
splicing loop: a batch mixing text-only and image samples is one masked scatter. Inputs made by the
processor carry the tokenizer's <image> token (config.image_token_id) instead; generate maps it.
"""
import copy
import warnings
from contextlib import contextmanager

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel, \
    GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.configuration_utils import SubConfigSpec
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

try:
    from .compressors import Projector, Resampler, sincos_positions
    from .constants import IGNORE, IMAGE_SLOT
except ImportError:
    from compressors import Projector, Resampler, sincos_positions
    from constants import IGNORE, IMAGE_SLOT

# VLM.forward asks for hidden states; under FSDP the first (the embedding output) comes back as a
# view, and FSDP warns that an in-place op on it would skip its hook. Nothing writes into it.
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

SELECT_LAYER = -2  # LLaVA-1.5: second-to-last layer of CLIP (--mm_vision_select_layer; docs/sources.md)


class VLMConfig(PretrainedConfig):
    """What makes the model and how it was trained, written once as config.json. text_config and
    vision_config are the LLM's and the tower's own configs; the rest is this repository's:
      llm, vision        --llm and --vision as given (a hub name or a directory)
      tokens, compressor V visual tokens per image and the compressor (compressors.COMPRESSORS)
      grid, select_layer, key_layers, vision_width, llm_width   the shapes the projector was built for
      llm_dtype          the dtype the LLM is saved in: its checkpoint's (vlm.save)
      conv_template, image_aspect, image_first   how prompts and images were rendered in training
      loss_norm, stage, steps, settings          how it was trained (train.py)
      image_token_id     the saved tokenizer's <image>, which the processor puts where visual tokens go"""
    model_type = "quecc_vlm"
    sub_configs_defaults = {"text_config": SubConfigSpec(AutoConfig, model_type="qwen2", optional=True),
                            "vision_config": SubConfigSpec(CLIPVisionConfig, optional=True)}

    llm: str = ""
    vision: str = ""
    tokens: int = 1
    compressor: str = "quecc"
    grid: int = 24
    select_layer: int = SELECT_LAYER
    key_layers: list[int] | None = None
    vision_width: int = 1024
    llm_width: int = 1024
    llm_dtype: str = "float32"
    conv_template: str = "chat"
    image_aspect: str = "pad"
    image_first: bool = True
    loss_norm: str = "tokens"
    stage: int | None = None
    steps: int | None = None
    settings: dict | None = None
    image_token_id: int | None = None
    text_config: dict | PretrainedConfig | None = None
    vision_config: dict | PretrainedConfig | None = None


class VLM(PreTrainedModel, GenerationMixin):
    config_class = VLMConfig
    # Loaded in fp32 whatever dtype the LLM loads in (bf16 for a Qwen1.5-based model): the tower as
    # CLIP stores it, the projector as it trained.
    _keep_in_fp32_modules_strict = ["vision.", "projector."]

    def __init__(self, config, llm=None, vision=None):
        """From the config alone (loading), or around an LLM and a vision tower already loaded
        (vlm.build), whose generation settings (end-of-sequence ids, ...) it takes."""
        super().__init__(config)
        self.llm = llm if llm is not None else AutoModelForCausalLM.from_config(config.text_config)
        self.vision = vision if vision is not None else CLIPVisionModel(config.vision_config)
        self.projector = Projector(config.compressor, config.tokens, config.grid, config.vision_width,
                                   config.llm_width, len(config.key_layers))
        if llm is not None:
            self.generation_config = copy.deepcopy(llm.generation_config)
        self.vision.requires_grad_(False)  # frozen in both stages: never trained, never in the optimizer
        if self.llm.config._attn_implementation == "sdpa":  # the same sdpa; a packed batch one sample at a time
            self.llm.config._attn_implementation = PER_SAMPLE
        self._pending = None
        self.llm.get_input_embeddings().register_forward_hook(self._insert_visual)
        self.post_init()

    def _init_weights(self, module):
        """Every weight comes from a checkpoint or from its module's own init. Loading builds the model
        on the meta device, so the one tensor a checkpoint does not hold is computed here: the
        resampler's fixed positions (a buffer not saved)."""
        if isinstance(module, Resampler):
            module.positions = sincos_positions(module.grid, module.latents.shape[1]).to(module.latents.device)

    @torch.no_grad()
    def encode_images(self, pixel_values):
        """-> patches (B, grid^2, C) of the select layer and, if the projector uses them,
        the key layers concatenated on channels (B, grid^2, 4C). CLS is dropped."""
        self.vision.eval()
        states = self.vision(pixel_values.to(self.vision.dtype), output_hidden_states=True).hidden_states
        patches = states[self.config.select_layer][:, 1:]
        multi_level = None
        if self.projector.needs_multi_level:
            multi_level = torch.cat([states[i][:, 1:] for i in self.config.key_layers], dim=-1)
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
            if query_ids is None:
                raise ValueError(f"the {self.config.compressor} projector reads the question: pass query_ids "
                                 "and query_mask (the processor makes them)")
            question = self.question_embedding(query_ids, query_mask)[has_image]
        if has_image.any():
            visual = self.visual_tokens(pixel_values, question, features)
        with self.armed(input_ids, visual) as ids:
            yield ids

    def forward(self, input_ids, attention_mask, labels, query_ids, query_mask, has_image,
                pixel_values=None, features=None, position_ids=None):
        """Training's forward (answers come from generate): -> (sum of token losses, number of label
        tokens). The caller divides, so the loss can be normalised over a whole global batch, however
        it is split.
        Logits only where a label is: in stage 2 at V = 576 about six positions in seven are
        visual or prompt tokens, and the head (vocabulary x width) is a third of a 0.5B LLM.
        position_ids: a packed batch (conversation.collate_rows), rows of samples whose positions
        restart at 0 with each; attention_mask then only marks its real tokens."""
        # Through the whole LLM, so FSDP gathers its root unit (embeddings, head), which fully_shard
        # leaves gathered until backward (tests/test_label_loss.py checks it on 2 processes): the
        # final hidden states after the last norm, its own head on one position only. The head
        # runs below, on the label positions.
        with self.inputs(input_ids, query_ids, query_mask, has_image, pixel_values, features) as ids:
            hidden = self.llm(input_ids=ids, output_hidden_states=True, logits_to_keep=1,
                              **attention_inputs(attention_mask, position_ids)).hidden_states[-1]
        targets = labels[:, 1:]
        at_label = targets != IGNORE  # position t predicts label t + 1
        loss = label_loss(self.llm.get_output_embeddings(), hidden[:, :-1][at_label], targets[at_label])
        return loss, at_label.sum()

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, pixel_values=None, query_ids=None, query_mask=None,
                 features=None, **generate_kwargs):
        """The LLM's generate (its generation settings, here in generation_config.json, updated by
        generate_kwargs) on a left-padded batch whose image samples carry V slots each: IMAGE_SLOT
        ids (conversation.prompt) or the processor's <image> token. -> input_ids followed by the
        new tokens, as any Hugging Face generate."""
        slots = input_ids == IMAGE_SLOT
        if self.config.image_token_id is not None:
            slots |= input_ids == self.config.image_token_id
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        with self.inputs(input_ids.masked_fill(slots, IMAGE_SLOT), query_ids, query_mask, slots.any(1),
                         pixel_values, features) as ids:
            out = self.llm_generate(ids, attention_mask, **generate_kwargs)
        return torch.cat([input_ids, out[:, input_ids.shape[1]:]], dim=1)

    def llm_generate(self, input_ids, attention_mask, generation_config=None, **generate_kwargs):
        """The LLM's generate under generation_config, by default this model's generation settings (the
        LLM's own, saved as generation_config.json), updated by generate_kwargs."""
        settings = copy.deepcopy(generation_config or self.generation_config)
        other_kwargs = settings.update(**generate_kwargs)  # what is not a generation setting (synced_gpus, ...)
        return self.llm.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=settings,
                                 **other_kwargs)


def attention_inputs(attention_mask, position_ids=None):
    """The LLM's masking inputs for a training forward. Padded: the padding mask. Packed: no mask
    but position ids that restart with each sample, from which transformers builds a block-diagonal
    causal mask (masking_utils.find_packed_sequence_indices) that any attention honours; and where
    each sample starts in the rows laid end to end (cu_seq_lens, FlashAttention's variable-length
    inputs), with which attend_per_sample and FlashAttention attend within each sample's span
    instead of computing the whole masked square of a row. transformers builds the mask only when
    the forward has no cache, and a training forward would make one (the config's use_cache):
    hence use_cache=False, which changes nothing else."""
    if position_ids is None:
        return dict(attention_mask=attention_mask, use_cache=False)
    starts = (position_ids.flatten() == 0).nonzero().flatten()
    bounds = torch.cat([starts, starts.new_tensor([position_ids.numel()])]).int()
    longest = int(bounds.diff().max())
    return dict(position_ids=position_ids, use_cache=False, cu_seq_lens_q=bounds, cu_seq_lens_k=bounds,
                max_length_q=longest, max_length_k=longest)


PER_SAMPLE = "sdpa_per_sample"  # the attention implementation VLM gives an sdpa LLM


def attend_per_sample(module, query, key, value, attention_mask, cu_seq_lens_q=None, **kwargs):
    """transformers' sdpa, but a packed batch (cu_seq_lens_q, attention_inputs) attends one sample at
    a time, over its own span: under the block-diagonal mask sdpa computes each row's whole square
    and discards the rest (bench_packing.py's packing_mask, docs/benches.md). -> (output (rows,
    length, heads, head width), None), as sdpa's."""
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    rows, _, length, _ = query.shape
    tokens = [t.transpose(1, 2).flatten(0, 1) for t in (query, key, value)]  # (rows x length, heads, width)
    bounds = cu_seq_lens_q.tolist()
    spans = [sdpa_attention_forward(module, *(t[a:b].transpose(0, 1)[None] for t in tokens), None, **kwargs)[0][0]
             for a, b in zip(bounds, bounds[1:])]
    return torch.cat(spans).unflatten(0, (rows, length)), None


# Registered wherever this file is imported, in a saved model folder too; the name is not saved (a
# loaded model gets sdpa back and VLM.__init__ makes it this again)
AttentionInterface.register(PER_SAMPLE, attend_per_sample)
AttentionMaskInterface.register(PER_SAMPLE, sdpa_mask)  # padded batches: sdpa's own masks


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


# save_pretrained copies this file and those it imports into the folder and names the classes in
# config.json's auto_map
VLMConfig.register_for_auto_class()
VLM.register_for_auto_class("AutoModelForImageTextToText")
