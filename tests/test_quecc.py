"""The projector: shapes for every token count, conditioning on the question, locality."""
import pytest
import torch

from compressors import Projector
from quecc import key_layers, split_regions, valid_token_counts

GRID, WIDTH, LLM_WIDTH = 24, 32, 48


def make(compressor, tokens):
    torch.manual_seed(0)
    return Projector(compressor, tokens, GRID, WIDTH, LLM_WIDTH).eval()


def inputs(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, GRID * GRID, WIDTH, generator=g),
            torch.randn(batch, GRID * GRID, 4 * WIDTH, generator=g),
            torch.randn(batch, LLM_WIDTH, generator=g))


def test_valid_token_counts_are_the_papers():
    assert valid_token_counts(24) == [1, 4, 9, 16, 36, 64, 144, 576]


@pytest.mark.parametrize("compressor", ["quecc", "tokenpacker", "pool"])
@pytest.mark.parametrize("tokens", [1, 4, 9, 16, 36, 64, 144, 576])
def test_every_valid_token_count_gives_batch_v_dllm(compressor, tokens):
    out = make(compressor, tokens)(*inputs(batch=3))
    assert out.shape == (3, tokens, LLM_WIDTH)
    assert torch.isfinite(out).all()


def test_mlp_keeps_all_patches():
    assert make("mlp", 576)(*inputs()).shape == (2, 576, LLM_WIDTH)


@pytest.mark.parametrize("compressor,tokens", [("quecc", 5), ("quecc", 25), ("pool", 2), ("mlp", 4)])
def test_invalid_token_count_is_refused_with_the_valid_list(compressor, tokens):
    with pytest.raises(ValueError, match="valid values: .*576"):
        Projector(compressor, tokens, GRID, WIDTH, LLM_WIDTH)


def test_quecc_depends_on_the_question_tokenpacker_does_not():
    patches, multi, question = inputs()
    other_question = question + 1.0
    quecc, packer = make("quecc", 4), make("tokenpacker", 4)
    assert not torch.allclose(quecc(patches, multi, question), quecc(patches, multi, other_question))
    assert torch.equal(packer(patches, multi, question), packer(patches, multi, other_question))


@pytest.mark.parametrize("compressor", ["quecc", "tokenpacker", "pool"])
@pytest.mark.parametrize("tokens", [4, 16])
def test_output_token_r_sees_only_region_r(compressor, tokens):
    """Change every patch outside region r: token r must not move, the others must."""
    projector = make(compressor, tokens)
    patches, multi, question = inputs(batch=1)
    side, k = int(tokens ** 0.5), GRID // int(tokens ** 0.5)
    r = tokens - 1  # the bottom-right region
    row, col = divmod(r, side)
    inside = torch.zeros(GRID, GRID, dtype=torch.bool)
    inside[row * k:(row + 1) * k, col * k:(col + 1) * k] = True
    outside = ~inside.flatten()
    changed_patches, changed_multi = patches.clone(), multi.clone()
    changed_patches[:, outside] += torch.randn_like(changed_patches[:, outside])
    changed_multi[:, outside] += torch.randn_like(changed_multi[:, outside])
    before = projector(patches, multi, question)
    after = projector(changed_patches, changed_multi, question)
    scale = before.abs().max().item()  # TokenPacker's 0.02 init gives outputs near 1e-4
    assert torch.allclose(before[:, r], after[:, r], atol=1e-5 * scale)
    assert not torch.allclose(before[:, :r], after[:, :r], atol=1e-3 * scale)


def test_split_regions_matches_a_loop():
    tokens = torch.arange(GRID * GRID).reshape(1, GRID * GRID, 1).float()
    regions = split_regions(tokens, GRID, 2)
    grid = tokens.reshape(GRID, GRID)
    for r in range(4):
        row, col = divmod(r, 2)
        expected = grid[row * 12:(row + 1) * 12, col * 12:(col + 1) * 12].flatten()
        assert torch.equal(regions[r, :, 0], expected)


def test_key_layers_scale_with_depth():
    assert key_layers(24) == [12, 16, 22, 23]  # the release's layers for CLIP-L
    assert key_layers(6) == [3, 4, 6, 6]
    assert all(1 <= i <= 2 for i in key_layers(2))


def test_tokenpacker_is_initialised_as_its_authors_did():
    """TokenPacker's builder.py: query projection without bias, Linear weights truncated normal with
    std 0.02 and zero biases, LayerNorm weight 1 and bias 0 (QueCC keeps torch's defaults)."""
    projector = make("tokenpacker", 16)
    assert projector.compress.query_mlp[0].bias is None
    linears = [m for m in projector.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 8  # query, keys x2, values x2, attention output, to the LLM x2
    for linear in linears:
        assert linear.weight.std().item() == pytest.approx(0.02, rel=0.1) and linear.weight.abs().max() < 0.2
        assert linear.bias is None or (linear.bias == 0).all()
    for norm in (m for m in projector.modules() if isinstance(m, torch.nn.LayerNorm)):
        assert (norm.weight == 1).all() and (norm.bias == 0).all()
    quecc = make("quecc", 16)
    assert quecc.compress.query_mlp[0].bias is not None
    assert quecc.to_llm[0].weight.std().item() > 0.05  # torch's default, 1/sqrt(3 x 32)
