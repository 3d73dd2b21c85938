"""Every compressor behind `--compressor`, one registry, and the Projector that wraps any of them.

  quecc         the paper's query-conditioned convolutional cross-attention (quecc.py)
  tokenpacker   the same region attention with text-free, bilinear queries (its authors' init)
  pool          average-pool the patch grid to V cells
  mlp           LLaVA-1.5's projector on all patches (no compression)
  pixelshuffle  nanoVLM's / Idefics3's / SmolVLM's: stack each r x r block of patches into one
                token (V = (grid / r)^2), then one Linear without bias into the LLM
  resampler     a Perceiver resampler as MiniCPM-V's: V learned queries attend to every patch

Each is one class with quecc.Compressor's interface and one line in COMPRESSORS; train.py's
choices, vlm.py and the toy demo read the registry. The facts taken from each compressor's
source (formulas, inits, defaults) are in docs/sources.md.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # in a model folder (modeling_vlm.py explains)
    from .quecc import ATTENTION_HEADS, Compressor, QueCC, RegionAttention, Standardize, from_grid, split_regions, to_grid
except ImportError:
    from quecc import ATTENTION_HEADS, Compressor, QueCC, RegionAttention, Standardize, from_grid, split_regions, to_grid

PIXEL_SHUFFLE_MAX_WIDENING = 64  # r^2: the projection reads r^2 x the vision width; beyond 64x (r > 8) refused


def trunc_normal_init(module):
    """TokenPacker's builder.py and MiniCPM-V's resampler alike: Linear weights truncated normal
    std 0.02, biases 0; LayerNorms weight 1, bias 0, which is torch's init already."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class TokenPacker(RegionAttention):
    def __init__(self, tokens, grid, vision_width, llm_width, num_key_layers):
        super().__init__(tokens, grid, vision_width, num_key_layers)

    def head(self, llm_width):
        """Its builder initialises the whole projector, itself and the head, once both exist."""
        head = super().head(llm_width)
        for part in (self, head):
            part.apply(trunc_normal_init)
        return head


class AveragePool(Compressor):
    def __init__(self, tokens, grid, vision_width, llm_width, num_key_layers):
        super().__init__(vision_width)
        self.grid, self.side = grid, math.isqrt(tokens)

    def forward(self, patches, multi_level=None, question=None):
        return from_grid(F.adaptive_avg_pool2d(to_grid(patches, self.grid), self.side))


class AllPatches(Compressor):
    """LLaVA-1.5: no compression, the MLP on every patch."""
    valid_tokens = staticmethod(lambda grid: [grid * grid])
    rule = "it keeps every patch"

    def __init__(self, tokens, grid, vision_width, llm_width, num_key_layers):
        super().__init__(vision_width)

    def forward(self, patches, multi_level=None, question=None):
        return patches


def pixel_shuffle_tokens(grid):
    return [(grid // r) ** 2 for r in range(grid, 0, -1) if grid % r == 0 and r * r <= PIXEL_SHUFFLE_MAX_WIDENING]


class PixelShuffle(Compressor):
    """Each r x r block of patches becomes one token of r^2 x the width, its patches side by side
    in row-major order (nanoVLM's and Idefics3's pixel_shuffle), then one Linear without bias,
    weights normal with std 0.02 (nanoVLM's ModalityProjector): no MLP after it."""
    valid_tokens = staticmethod(pixel_shuffle_tokens)
    rule = f"r = sqrt(grid^2 / V) divides the grid side and r^2 <= {PIXEL_SHUFFLE_MAX_WIDENING}"

    def __init__(self, tokens, grid, vision_width, llm_width, num_key_layers):
        side = math.isqrt(tokens)
        super().__init__((grid // side) ** 2 * vision_width)
        self.grid, self.side = grid, side

    def forward(self, patches, multi_level=None, question=None):
        return split_regions(patches, self.grid, self.side).reshape(len(patches), self.side ** 2, self.out_width)

    def head(self, llm_width):
        linear = nn.Linear(self.out_width, llm_width, bias=False)
        nn.init.normal_(linear.weight, std=0.02)
        return linear


def sincos_positions(grid, width):
    """MAE's 2D sin-cos table, as MiniCPM-V's resampler builds it: (grid * grid, width), patches
    row-major; the first half of the channels encodes the column, the second half the row, each
    half the sines then the cosines of the position times 10000^(-i / (width / 4))."""
    quarter = width // 4
    frequencies = 10000.0 ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, columns = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")

    def encode(position):
        angles = position.flatten()[:, None] * frequencies
        return torch.cat([angles.sin(), angles.cos()], dim=1)
    return torch.cat([encode(columns), encode(rows)], dim=1).float()


class Resampler(Compressor):
    """MiniCPM-V's Perceiver resampler (one cross-attention, Flamingo's idea): V learned queries,
    LayerNormed, attend to all LayerNormed patches, the keys carrying 2D sin-cos positions; a
    LayerNorm after. Its authors' init: queries and Linear weights truncated normal std 0.02, biases
    0. Then LLaVA's mlp2x_gelu, where MiniCPM-V has one square matrix."""
    valid_tokens = staticmethod(lambda grid: range(1, grid * grid + 1))
    rule = "one query per token, at most one per patch"

    def __init__(self, tokens, grid, vision_width, llm_width, num_key_layers):
        super().__init__(vision_width)
        self.grid = grid
        self.latents = nn.Parameter(nn.init.trunc_normal_(torch.empty(tokens, vision_width), std=0.02))
        self.latent_norm = nn.LayerNorm(vision_width, eps=1e-6)
        self.patch_norm = nn.LayerNorm(vision_width, eps=1e-6)
        self.attention = nn.MultiheadAttention(vision_width, ATTENTION_HEADS, batch_first=True)
        self.out_norm = nn.LayerNorm(vision_width, eps=1e-6)
        self.register_buffer("positions", sincos_positions(grid, vision_width), persistent=False)  # fixed: not saved
        self.apply(trunc_normal_init)

    def forward(self, patches, multi_level=None, question=None):
        patches = self.patch_norm(patches)
        queries = self.latent_norm(self.latents).expand(len(patches), -1, -1)
        out, _ = self.attention(queries, patches + self.positions.to(patches.dtype), patches, need_weights=False)
        return self.out_norm(out)


COMPRESSORS = {"quecc": QueCC, "tokenpacker": TokenPacker, "pool": AveragePool, "mlp": AllPatches,
               "pixelshuffle": PixelShuffle, "resampler": Resampler}


def valid_tokens(compressor, grid):
    return COMPRESSORS[compressor].valid_tokens(grid)


def check_token_count(tokens, grid, compressor):
    """A token count the compressor cannot make on this grid: one line naming those it can."""
    valid = valid_tokens(compressor, grid)
    if tokens not in valid:
        listed = f"{valid[0]} to {valid[-1]}" if isinstance(valid, range) else ", ".join(map(str, valid))
        raise ValueError(f"--tokens {tokens} is not supported by compressor '{compressor}' on a {grid}x{grid} "
                         f"patch grid ({COMPRESSORS[compressor].rule}); valid values: {listed}")


class Projector(nn.Module):
    """compressor + its head into the LLM. forward(patches, multi_level, question) -> (B, V, llm_width).

    patches:     (B, grid*grid, width)  the select layer (-2), CLS dropped
    multi_level: (B, grid*grid, len(key_layers)*width), only for compressors that need_multi_level
    question:    (B, llm_width), the LLM's last hidden state of the question, only if it needs_question
    """

    def __init__(self, compressor, tokens, grid, vision_width, llm_width, num_key_layers=4):
        super().__init__()
        if compressor not in COMPRESSORS:
            raise ValueError(f"unknown compressor '{compressor}'; choose from {', '.join(COMPRESSORS)}")
        check_token_count(tokens, grid, compressor)
        self.compressor, self.tokens = compressor, tokens
        self.compress = COMPRESSORS[compressor](tokens, grid, vision_width, llm_width, num_key_layers)
        self.needs_question, self.needs_multi_level = self.compress.needs_question, self.compress.needs_multi_level
        self.to_llm = self.compress.head(llm_width)
        self.standardize_patches = Standardize(vision_width)
        self.standardize_multi_level = Standardize(num_key_layers * vision_width)

    def forward(self, patches, multi_level=None, question=None):
        patches, multi_level = self.standardize_patches(patches), self.standardize_multi_level(multi_level)
        return self.to_llm(self.compress(patches, multi_level, question))
