"""The paper's projector: CLIP patch features -> V visual tokens in the LLM's width.

QueCC compresses the patches to V tokens, then LLaVA-1.5's `mlp2x_gelu` (Linear, GELU, Linear)
maps them into the LLM. Before it, the features may be standardized per channel (off unless
fitted; see Standardize). QueCC is one of the compressors behind `--compressor`: the others
(TokenPacker, pooling, LLaVA's MLP, pixel shuffle, a Perceiver resampler), their registry and
the Projector that wraps any of them live in compressors.py; all share the interface of
Compressor below.

QueCC, step by step (Li et al. 2024, section 4; shapes for CLIP-L/336, V = 4):
  question embedding (B, d_llm) --Linear+LayerNorm--> (B, 1024), added to every patch
  patches (B, 576, 1024) + question --MLP--> queries on the 24x24 grid
  depthwise conv, kernel = stride = 24 / sqrt(V) = 12 --> (B, 4, 1024) queries
  4 encoder layers concatenated (B, 576, 4096) --MLP--> keys, --MLP--> values
  query r attends only to the 12x12 patches of region r --> (B, 4, 1024)
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# The release takes keys/values from hidden states 12, 16, 22 and 23 of the 24-layer CLIP-L
# (its clip_encoder.py, feature_select; docs/sources.md). Stated as fractions of depth they
# carry over to any encoder (a 6-layer toy gets 3, 4, 6, 6).
KEY_LAYER_FRACTIONS = (12 / 24, 16 / 24, 22 / 24, 23 / 24)
ATTENTION_HEADS = 8  # the release's multimodal_projector/quecc.py


def valid_token_counts(grid):
    """V works when sqrt(V) divides the grid side: each token owns a square region."""
    return [(grid // k) ** 2 for k in range(grid, 0, -1) if grid % k == 0]


def key_layers(depth):
    """Hidden-state indices (0 = embeddings, depth = last layer) used for keys/values."""
    return [min(depth, max(1, round(f * depth))) for f in KEY_LAYER_FRACTIONS]


def mlp2x_gelu(in_width, out_width):
    return nn.Sequential(nn.Linear(in_width, out_width), nn.GELU(), nn.Linear(out_width, out_width))


def feature_mlp(in_width, out_width):
    """The release's query/key/value transform: Linear, GELU, Linear, LayerNorm."""
    return nn.Sequential(nn.Linear(in_width, out_width), nn.GELU(),
                         nn.Linear(out_width, out_width), nn.LayerNorm(out_width, eps=1e-6))


def to_grid(tokens, grid):
    """(B, grid*grid, C) -> (B, C, grid, grid)"""
    return tokens.transpose(1, 2).unflatten(2, (grid, grid))


def from_grid(image):
    """(B, C, h, w) -> (B, h*w, C), row-major like the patch order."""
    return image.flatten(2).transpose(1, 2)


def split_regions(tokens, grid, side):
    """(B, grid*grid, C) -> (B*side*side, k*k, C): the patches of each of side x side regions."""
    b, _, c = tokens.shape
    k = grid // side
    regions = tokens.reshape(b, side, k, side, k, c).permute(0, 1, 3, 2, 4, 5)
    return regions.reshape(b * side * side, k * k, c)


class Compressor(nn.Module):
    """What every compressor is: built as Cls(tokens, grid, vision_width, llm_width, num_key_layers),
    called as forward(patches, multi_level, question) -> (B, V, out_width), followed by head(llm_width)
    into the LLM. needs_multi_level: it reads the key layers; needs_question: QueCC's question."""
    needs_question = needs_multi_level = False
    valid_tokens = staticmethod(valid_token_counts)  # grid -> the token counts it can make
    rule = "sqrt(V) divides the grid side"  # why those, for the refusal of any other

    def __init__(self, out_width):
        super().__init__()
        self.out_width = out_width

    def head(self, llm_width):
        """LLaVA-1.5's projector into the LLM, after every compressor unless its authors used another."""
        return mlp2x_gelu(self.out_width, llm_width)


class RegionAttention(Compressor):
    """Shared by QueCC and TokenPacker: query r attends to the patches of region r only. Keys and
    values come from several encoder layers: one token carries low-level detail and semantics."""
    needs_multi_level = True

    def __init__(self, tokens, grid, width, num_key_layers, text_width=None):
        super().__init__(width)
        self.grid, self.side = grid, math.isqrt(tokens)
        self.text_conditioned = text_width is not None
        if self.text_conditioned:
            self.text_proj = nn.Sequential(nn.Linear(text_width, width), nn.LayerNorm(width, eps=1e-6))
            kernel = grid // self.side
            # depthwise: each channel is pooled with its own learned k x k filter
            self.downsample = nn.Conv2d(width, width, kernel, stride=kernel, groups=width)
            self.query_mlp = feature_mlp(width, width)
        else:
            self.query_mlp = nn.Sequential(nn.Linear(width, width, bias=False), nn.LayerNorm(width, eps=1e-6))
        self.key_mlp = feature_mlp(num_key_layers * width, width)
        self.value_mlp = feature_mlp(num_key_layers * width, width)
        self.attention = nn.MultiheadAttention(width, ATTENTION_HEADS, batch_first=True)

    def queries(self, patches, question):
        if self.text_conditioned:
            fused = patches + self.text_proj(question)[:, None, :]
            return from_grid(self.downsample(to_grid(self.query_mlp(fused), self.grid)))
        pooled = F.interpolate(to_grid(patches, self.grid), size=(self.side, self.side),
                               mode="bilinear", align_corners=False)
        return self.query_mlp(from_grid(pooled))

    def forward(self, patches, multi_level, question=None):
        b, _, width = patches.shape
        queries = self.queries(patches, question).reshape(b * self.side ** 2, 1, width)
        keys = split_regions(self.key_mlp(multi_level), self.grid, self.side)
        values = split_regions(self.value_mlp(multi_level), self.grid, self.side)
        out, _ = self.attention(queries, keys, values, need_weights=False)
        return out.reshape(b, self.side ** 2, width)


class QueCC(RegionAttention):
    """The paper's compressor: queries from the patches and the question, pooled by a depthwise conv."""
    needs_question = True

    def __init__(self, tokens, grid, vision_width, llm_width, num_key_layers):
        super().__init__(tokens, grid, vision_width, num_key_layers, text_width=llm_width)


class Standardize(nn.Module):
    """Per-channel (x - mean) / std, statistics measured once on training images, then frozen.
    An identity until fit() (train.py --standardize-features). It is for encoders whose features
    share a large picture-independent part: in the random toy tower that part is ~3x the part
    that varies, and the projector, trained with Adam, then learns the small informative
    directions (an object's shape) slowly or not at all within a toy budget (docs/toy_world.md)."""

    def __init__(self, width):
        super().__init__()
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("std", torch.ones(width))

    @torch.no_grad()
    def fit(self, chunks):
        """chunks: an iterable of (..., width) tensors, accumulated in float64."""
        count, total, squares = 0, 0.0, 0.0
        for x in chunks:
            x = x.reshape(-1, x.shape[-1]).double()
            count, total, squares = count + len(x), total + x.sum(0), squares + (x * x).sum(0)
        mean = total / count
        self.mean.copy_(mean)
        self.std.copy_((squares / count - mean * mean).clamp_min(1e-12).sqrt())

    def forward(self, x):
        return None if x is None else (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
