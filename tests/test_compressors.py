"""Every compressor behind --compressor: shapes and gradients at every token count it makes, the
registry's refusals, pixel shuffle against nanoVLM's formula and Idefics3's connector, the
resampler's attention against plain torch, and the checkpoint layout of the compressors that
existed before the registry."""
import math
import sys

import numpy as np
import pytest
import torch

from compressors import COMPRESSORS, Projector, sincos_positions, valid_tokens

GRID, WIDTH, LLM_WIDTH = 24, 32, 48


def inputs(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, GRID * GRID, WIDTH, generator=g),
            torch.randn(batch, GRID * GRID, 4 * WIDTH, generator=g),
            torch.randn(batch, LLM_WIDTH, generator=g))


def counts_to_test(compressor):
    """Every count it makes; the resampler makes all of 1..576: the paper's grid and two others."""
    valid = valid_tokens(compressor, GRID)
    return [v for v in valid if math.isqrt(v) ** 2 == v and GRID % math.isqrt(v) == 0] + [5, 100] \
        if isinstance(valid, range) else valid


@pytest.mark.parametrize("compressor,tokens", [(c, v) for c in COMPRESSORS for v in counts_to_test(c)])
def test_every_compressor_gives_batch_v_dllm_and_gradients_at_every_token_count(compressor, tokens):
    torch.manual_seed(0)
    projector = Projector(compressor, tokens, GRID, WIDTH, LLM_WIDTH)
    features = [x.requires_grad_(True) for x in inputs(batch=3)]
    out = projector(*features)
    assert out.shape == (3, tokens, LLM_WIDTH) and torch.isfinite(out).all()
    (out * torch.randn_like(out)).sum().backward()
    # a region of one patch has one key, so at V = 576 QueCC's queries (all it takes from the select
    # layer and the question) get a zero gradient: the gradient reaches the features it reads
    assert sum(x.grad.abs().sum() for x in features if x.grad is not None) > 0
    for name, parameter in projector.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    assert projector.to_llm.weight.grad.abs().sum() > 0 if compressor == "pixelshuffle" else \
        projector.to_llm[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("tokens", [1, 4, 5, 25])
def test_pixel_shuffle_refuses_blocks_wider_than_64_patches_naming_the_valid_counts(tokens):
    """V = 4 on 24x24 would stack 12 x 12 = 144 patches into one token: a Linear reading 144x the width."""
    with pytest.raises(ValueError, match=r"'pixelshuffle' .*r\^2 <= 64\); valid values: 9, 16, 36, 64, 144, 576$"):
        Projector("pixelshuffle", tokens, GRID, WIDTH, LLM_WIDTH)


def test_resampler_refuses_more_queries_than_patches():
    with pytest.raises(ValueError, match="valid values: 1 to 576"):
        Projector("resampler", 577, GRID, WIDTH, LLM_WIDTH)


def test_a_bad_token_count_is_refused_before_the_models_load(monkeypatch, tmp_path):
    """01/02 (train.main) check --tokens against the registry from the tower's config alone."""
    import train
    monkeypatch.setattr(train, "build_model", lambda *a: pytest.fail("the models were built"))
    (tmp_path / "d.json").write_text("[]")
    monkeypatch.setattr(sys, "argv", ["01", "--llm", "toy", "--vision", "toy", "--compressor", "pixelshuffle", "--tokens",
                                      "4", "--data", str(tmp_path / "d.json"), "--output-dir", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as refusal:
        train.main(dict(description="", lr=1e-3, batch_size=8, train_llm=False, output="stage1", data="d.json",
                        image_folder=".", source=""))
    assert str(refusal.value) == (
        "error: --tokens 4 is not supported by compressor 'pixelshuffle' on a 24x24 patch grid (r = sqrt(grid^2 / V) "
        "divides the grid side and r^2 <= 64); valid values: 9, 16, 36, 64, 144, 576")


def nanovlm_pixel_shuffle(x, scale_factor):
    """nanoVLM's models/modality_projector.py, pixel_shuffle, written out."""
    bsz, seq, embed_dim = x.size()
    height = width = int(seq ** 0.5)
    x = x.view(bsz, height, width, embed_dim)
    h_out, w_out = height // scale_factor, width // scale_factor
    x = x.reshape(bsz, h_out, scale_factor, w_out, scale_factor, embed_dim)
    x = x.permute(0, 1, 3, 2, 4, 5).contiguous()
    return x.reshape(bsz, h_out * w_out, embed_dim * scale_factor ** 2)


@pytest.mark.parametrize("tokens,factor", [(9, 8), (16, 6), (64, 3), (576, 1)])
def test_pixel_shuffle_is_nanovlms_and_idefics3s_connector(tokens, factor):
    from transformers import Idefics3Config
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector
    projector = Projector("pixelshuffle", tokens, GRID, WIDTH, LLM_WIDTH)
    head = projector.to_llm  # nanoVLM's ModalityProjector: one Linear, no bias, no MLP after it
    assert isinstance(head, torch.nn.Linear) and head.bias is None and head.in_features == factor ** 2 * WIDTH
    assert head.weight.std().item() == pytest.approx(0.02, rel=0.1) and abs(head.weight.mean().item()) < 0.002
    patches, _, _ = inputs()
    out = projector(patches)
    assert torch.allclose(out, nanovlm_pixel_shuffle(patches, factor) @ head.weight.T, atol=1e-6)
    # token (i, j): the patches of block (i, j) side by side, row by row
    block = patches.reshape(2, GRID, GRID, WIDTH)[:, factor:2 * factor, :factor].reshape(2, -1)
    assert torch.allclose(out[:, GRID // factor], block @ head.weight.T, atol=1e-6)
    config = Idefics3Config(vision_config={"hidden_size": WIDTH}, scale_factor=factor, text_config={
        "hidden_size": LLM_WIDTH, "num_attention_heads": 4, "num_key_value_heads": 4})
    connector = Idefics3Connector(config)
    connector.modality_projection.proj.weight.data.copy_(head.weight)
    assert torch.allclose(out, connector(patches), atol=1e-6)


def mae_sincos(embed_dim, grid_size):
    """MAE's util/pos_embed.py get_2d_sincos_pos_embed (MiniCPM-V's resampler uses it), written out."""
    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    grid = np.stack(np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64)))
    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


def test_resampler_positions_are_maes_2d_sincos():
    assert np.allclose(sincos_positions(GRID, WIDTH).numpy(), mae_sincos(WIDTH, GRID), atol=1e-6)


def test_resampler_attention_is_plain_multi_head_cross_attention():
    """Written out with matrix products: LayerNormed queries against LayerNormed patches, positions
    on the keys only, 8 heads, the output projection, then the LayerNorm after."""
    torch.manual_seed(0)
    projector = Projector("resampler", 5, GRID, WIDTH, LLM_WIDTH)
    r = projector.compress
    with torch.no_grad():  # away from the init, so every weight counts
        for parameter in r.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    patches, _, _ = inputs()
    norm = torch.nn.functional.layer_norm
    q_in = norm(r.latents, (WIDTH,), r.latent_norm.weight, r.latent_norm.bias, 1e-6)
    kv_in = norm(patches, (WIDTH,), r.patch_norm.weight, r.patch_norm.bias, 1e-6)
    w_q, w_k, w_v = r.attention.in_proj_weight.chunk(3)
    b_q, b_k, b_v = r.attention.in_proj_bias.chunk(3)
    heads, d = 8, WIDTH // 8
    q = (q_in @ w_q.T + b_q).reshape(5, heads, d).transpose(0, 1)  # (heads, 5, d), the same for every image
    k = ((kv_in + sincos_positions(GRID, WIDTH)) @ w_k.T + b_k).reshape(2, -1, heads, d).transpose(1, 2)
    v = (kv_in @ w_v.T + b_v).reshape(2, -1, heads, d).transpose(1, 2)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)  # (2, heads, 5, 576)
    attended = (weights @ v).transpose(1, 2).reshape(2, 5, WIDTH) @ r.attention.out_proj.weight.T + r.attention.out_proj.bias
    expected = norm(attended, (WIDTH,), r.out_norm.weight, r.out_norm.bias, 1e-6)
    assert torch.allclose(r(patches), expected, atol=1e-5)


def test_every_resampler_token_sees_every_patch():
    """Unlike the region compressors: one patch changed moves every token."""
    projector = Projector("resampler", 4, GRID, WIDTH, LLM_WIDTH).double()  # at its init the moves are small
    patches, changed = inputs(batch=2)[0].double().split(1)
    changed[:, 1:] = patches[:, 1:]  # only the first patch differs
    before = projector(patches)
    moved = (before - projector(changed)).abs().amax(-1)
    assert (moved > 1e-6 * before.abs().max()).all()


def region_keys(query, downsample):
    layers = [f"compress.{mlp}.{i}.{p}" for mlp in ("key_mlp", "value_mlp") for i in (0, 2, 3) for p in ("weight", "bias")]
    layers += [f"compress.attention.{p}" for p in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")]
    return set(layers + query + (["compress.downsample.weight", "compress.downsample.bias"] if downsample else []))


ALWAYS = {f"standardize_{x}.{s}" for x in ("patches", "multi_level") for s in ("mean", "std")} | \
         {f"to_llm.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
QUECC_QUERY = [f"compress.{m}.{i}.{p}" for m, layers in (("text_proj", (0, 1)), ("query_mlp", (0, 2, 3)))
               for i in layers for p in ("weight", "bias")]


@pytest.mark.parametrize("compressor,tokens,keys", [
    ("quecc", 4, region_keys(QUECC_QUERY, downsample=True) | ALWAYS),
    ("tokenpacker", 4, region_keys(["compress.query_mlp.0.weight", "compress.query_mlp.1.weight",
                                    "compress.query_mlp.1.bias"], downsample=False) | ALWAYS),
    ("pool", 4, ALWAYS), ("mlp", 576, ALWAYS)])
def test_checkpoints_written_before_the_registry_still_load(compressor, tokens, keys):
    """projector.safetensors of a quecc/tokenpacker/pool/mlp run names its tensors as quecc.py's
    Projector did before the registry (vlm.load_projector loads it strictly)."""
    assert set(Projector(compressor, tokens, GRID, WIDTH, LLM_WIDTH).state_dict()) == keys


@pytest.mark.parametrize("compressor", ["pixelshuffle", "resampler"])
def test_a_saved_projector_of_a_new_compressor_loads_as_it_was(tmp_path, compressor):
    """The resampler's positions are rebuilt from the grid, not saved; everything else round-trips."""
    import vlm
    torch.manual_seed(0)
    model, tokenizer, _ = vlm.build("toy-xs", "toy", 16, compressor)
    with torch.no_grad():
        for parameter in model.projector.parameters():  # away from any init the loader could rebuild
            parameter.add_(torch.randn_like(parameter))
    vlm.save(model, tokenizer, tmp_path, save_llm=False)
    loaded, _, _ = vlm.load_pretrained(tmp_path)
    patches = torch.randn(2, GRID * GRID, model.config.vision_width)
    assert loaded.config.compressor == compressor
    assert torch.equal(loaded.projector(patches), model.projector(patches))
