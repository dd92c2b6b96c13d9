"""Tests for mtlearn.blocks: shapes, bad arguments, what each block promises."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mtlearn.blocks import (ASPPDFE, DFE, ECA, BasicBlock, DropPath, PatchEmbed, PatchMerging, ResFormerStage,
                            SpatialAttention, SwinBlock, WindowAttention, window_partition, window_reverse)


@pytest.fixture(autouse=True)
def seeded():
    """Each test draws its random inputs from seed 0, whatever ran before it (a seed at import set the generator
    once, at collection, so a test's inputs depended on the tests run before it)."""
    torch.manual_seed(0)


SHAPES = [
    # (name, block factory, input shape, expected output shape)
    ("eca", lambda: ECA(), (2, 8, 5, 7), (2, 8, 5, 7)),
    ("spatial attention", lambda: SpatialAttention(), (2, 8, 5, 7), (2, 8, 5, 7)),
    ("basic block", lambda: BasicBlock(8, 8), (2, 8, 6, 10), (2, 8, 6, 10)),
    ("basic block stride 2", lambda: BasicBlock(8, 16, stride=2), (2, 8, 6, 10), (2, 16, 3, 5)),
    ("drop path", lambda: DropPath(0.5), (4, 3, 2, 2), (4, 3, 2, 2)),
    ("patch embed grey", lambda: PatchEmbed(1, 16), (2, 1, 32, 48), (2, 16, 16, 24)),
    ("patch embed rgb", lambda: PatchEmbed(3, 8), (1, 3, 16, 16), (1, 8, 8, 8)),
    ("patch merging", lambda: PatchMerging(8, 16), (2, 8, 8, 12), (2, 16, 4, 6)),
    ("stage stride 1", lambda: ResFormerStage(8, 8, 1, cnn_depth=1, attn_depth=2, num_heads=2, window_size=4),
     (2, 8, 8, 12), (2, 8, 8, 12)),
    ("stage stride 2", lambda: ResFormerStage(8, 16, 2, cnn_depth=2, attn_depth=1, num_heads=2, window_size=4),
     (2, 8, 16, 8), (2, 16, 8, 4)),
    ("stage cnn only", lambda: ResFormerStage(8, 16, 2, cnn_depth=1, attn_depth=0, num_heads=2, window_size=4),
     (2, 8, 8, 8), (2, 16, 4, 4)),
    ("dfe three", lambda: DFE(8), (2, 8, 8, 12), (2, 8, 8, 12)),
    ("dfe four", lambda: ASPPDFE(8), (2, 8, 8, 12), (2, 8, 8, 12)),
    ("dfe four no residual", lambda: ASPPDFE(8, residual=False), (2, 8, 4, 4), (2, 8, 4, 4)),
]


@pytest.mark.parametrize("name, factory, in_shape, out_shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_block_shapes(name, factory, in_shape, out_shape):
    out = factory()(torch.randn(in_shape))
    assert out.shape == out_shape
    assert torch.isfinite(out).all()


SWIN_SHAPES = [
    # (H, W, window_size, shift): square, non-square, not a multiple of the window, smaller than it
    (8, 8, 4, False), (8, 8, 4, True), (6, 10, 4, True), (6, 6, 4, False), (3, 5, 4, True), (4, 4, 4, True),
    # one side shifted only, either one; an odd window (112 px images: 112 // 16 = 7) shifted by 3
    (4, 8, 4, True), (8, 4, 4, True), (14, 14, 7, True),
]


@pytest.mark.parametrize("height, width, window_size, shift", SWIN_SHAPES)
def test_swin_block_shapes(height, width, window_size, shift):
    block = SwinBlock(16, 2, window_size, shift=shift)
    out = block(torch.randn(2, height, width, 16))
    assert out.shape == (2, height, width, 16)
    assert torch.isfinite(out).all()


BAD_ARGUMENTS = [
    ("eca even kernel", lambda: ECA(kernel_size=2), "odd"),
    ("spatial attention even kernel", lambda: SpatialAttention(kernel_size=4), "odd"),
    ("basic block stride 3", lambda: BasicBlock(8, 8, stride=3), "stride"),
    ("basic block no channels", lambda: BasicBlock(0, 4), "in_channels must be an integer >= 1, got 0"),
    ("dfe no channels", lambda: DFE(0), "channels must be an integer >= 1, got 0"),  # built, with a UserWarning
    ("aspp no channels", lambda: ASPPDFE(0), "channels must be an integer >= 1, got 0"),
    ("drop path 1", lambda: DropPath(1.0), "drop_prob"),
    ("attention head dim", lambda: WindowAttention(10, 3), "divisible"),
    ("attention float heads", lambda: WindowAttention(16, 2.0), r"num_heads 2\.0 .*pass an int that divides dim"),
    ("swin float window", lambda: SwinBlock(16, 2, window_size=64 / 16), r"window_size .*got 4\.0; pass an int"),
    ("swin window 0", lambda: SwinBlock(16, 2, window_size=0), "window_size must be an int >= 1"),
    ("swin empty mlp", lambda: SwinBlock(16, 2, window_size=4, mlp_ratio=0.05), r"0 hidden units.*at least 1 / 16"),
    ("patch embed width", lambda: PatchEmbed(1, 12), "multiple of 8"),
    ("patch merging odd", lambda: PatchMerging(8, 15), "even"),
    ("dfe no dilations", lambda: DFE(8, dilations=()), "dilations"),
    ("dfe zero dilation", lambda: DFE(8, dilations=(0, 6)), "dilations"),
    ("aspp negative dilation", lambda: ASPPDFE(8, dilations=(6, -1)), "dilations"),
    ("stage no cnn",
     lambda: ResFormerStage(8, 8, 1, cnn_depth=0, attn_depth=1, num_heads=2, window_size=4), "cnn_depth"),
    ("stage drop path length",
     lambda: ResFormerStage(8, 8, 1, cnn_depth=1, attn_depth=2, num_heads=2, window_size=4, drop_path=[0.1]),
     "drop_path"),
    ("stage width change at stride 1",
     lambda: ResFormerStage(8, 16, 1, cnn_depth=1, attn_depth=1, num_heads=2, window_size=4), "stride-1"),
    # floats for counts failed inside torch with a TypeError naming no argument; zeros and a negative rate built
    ("eca float kernel", lambda: ECA(3.0), r"ECA kernel_size must be a positive odd integer, got 3\.0"),
    ("spatial attention float kernel", lambda: SpatialAttention(7.0), r"kernel_size .* got 7\.0"),
    ("attention float dim", lambda: WindowAttention(64.0, 2), r"dim must be an integer >= 1, got 64\.0; pass an int"),
    ("swin float dim", lambda: SwinBlock(64.0, 2, window_size=4), r"dim must be an integer >= 1, got 64\.0"),
    ("swin bool dim", lambda: SwinBlock(True, 1, window_size=4), r"dim must be an integer >= 1, got True"),
    ("swin negative drop path", lambda: SwinBlock(16, 2, window_size=4, drop_path=-0.1),
     r"drop_path must be a number in \[0, 1\), got -0\.1"),
    ("drop path nan", lambda: DropPath(float("nan")), "drop_prob must be a number"),
    # attn_dropout 1.5 built, then failed in the first training forward with torch's "dropout probability"
    ("attention dropout above 1", lambda: WindowAttention(16, 2, attn_dropout=1.5),
     r"attn_dropout must be a number in \[0, 1\), got 1\.5"),
    ("attention negative dropout", lambda: WindowAttention(16, 2, attn_dropout=-1),
     r"attn_dropout must be a number in \[0, 1\), got -1"),
    ("swin dropout 1", lambda: SwinBlock(16, 2, window_size=4, dropout=1.0), r"dropout must be a number in \[0, 1\)"),
    ("patch embed float width", lambda: PatchEmbed(1, 64.0), r"out_channels must be an integer >= 1, got 64\.0"),
    ("patch embed no input", lambda: PatchEmbed(0, 64), "in_channels must be an integer >= 1, got 0"),
    ("patch merging no output", lambda: PatchMerging(64, 0), "out_channels must be an integer >= 1, got 0"),
    ("patch merging float width", lambda: PatchMerging(64, 128.0), r"got 128\.0"),
    ("stage float cnn depth",
     lambda: ResFormerStage(8, 8, 1, cnn_depth=2.0, attn_depth=1, num_heads=2, window_size=4), r"cnn_depth .*got 2\.0"),
    ("stage float attention depth",
     lambda: ResFormerStage(8, 8, 1, cnn_depth=1, attn_depth=1.0, num_heads=2, window_size=4),
     r"attn_depth must be an integer >= 0, got 1\.0"),
]


def test_drop_path_rates_may_be_one_element_tensors():
    """The items of torch.linspace(0, 0.1, depth), as timm builds the rates, worked before the rates were checked."""
    stage = ResFormerStage(8, 16, 2, cnn_depth=1, attn_depth=2, num_heads=2, window_size=4,
                           drop_path=torch.linspace(0, 0.1, 2))
    assert isinstance(stage.transformer[0].drop_path, nn.Identity)
    assert stage.transformer[1].drop_path.drop_prob == pytest.approx(0.1) and \
        type(stage.transformer[1].drop_path.drop_prob) is float
    assert DropPath(np.float32(0.2)).drop_prob == pytest.approx(0.2)


@pytest.mark.parametrize("name, factory, message", BAD_ARGUMENTS, ids=[b[0] for b in BAD_ARGUMENTS])
def test_bad_arguments(name, factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


def test_gates_scale_by_values_in_zero_one():
    x = torch.rand(2, 8, 6, 6) + 0.1
    for gate in (ECA(), SpatialAttention()):
        ratio = gate(x) / x
        assert (ratio > 0).all() and (ratio < 1).all()
    # ECA: one gate per (sample, channel); spatial attention: one gate per (sample, pixel)
    eca_ratio = ECA()(x) / x
    assert torch.allclose(eca_ratio, eca_ratio[..., :1, :1].expand_as(x), atol=1e-6)
    spatial_ratio = SpatialAttention()(x) / x
    assert torch.allclose(spatial_ratio, spatial_ratio[:, :1].expand_as(x), atol=1e-6)


@pytest.mark.parametrize("channel, summary", [(0, lambda x: x.mean(dim=1, keepdim=True)),
                                             (1, lambda x: x.amax(dim=1, keepdim=True))])
def test_spatial_attention_gate_reads_the_channel_mean_and_max(channel, summary):
    # a convolution that copies one input map (centre tap 1, all others 0) makes the gate sigmoid(that map)
    gate = SpatialAttention()
    with torch.no_grad():
        gate.conv.weight.zero_()
        gate.conv.weight[0, channel, 3, 3] = 1.0
    x = torch.randn(2, 8, 5, 7)
    assert torch.allclose(gate(x), x * torch.sigmoid(summary(x)), atol=1e-6)


@pytest.mark.parametrize("taps, neighbour", [((0.0, 1.0, 0.0), 0), ((1.0, 0.0, 0.0), -1), ((0.0, 0.0, 1.0), 1)])
def test_eca_gate_is_a_sigmoid_of_neighbouring_channel_means(taps, neighbour):
    # ECA pools each channel to its mean, then a 1-D convolution over the channel sequence (zero-padded ends)
    eca = ECA()
    with torch.no_grad():
        eca.conv.weight.copy_(torch.tensor(taps).view(1, 1, 3))
    x = torch.randn(2, 8, 5, 7)
    means = F.pad(x.mean(dim=(2, 3)), (1, 1))  # (B, C + 2): channel c at index c + 1
    read = means[:, 1 + neighbour:1 + neighbour + 8]  # channel c reads channel c + neighbour
    assert torch.allclose(eca(x), x * torch.sigmoid(read)[:, :, None, None], atol=1e-6)


@pytest.mark.parametrize("in_channels, out_channels, stride", [(8, 8, 1), (8, 16, 2)])
def test_basic_block_adds_the_shortcut_before_its_last_relu(in_channels, out_channels, stride):
    block = BasicBlock(in_channels, out_channels, stride)
    x = torch.randn(2, in_channels, 6, 10)
    assert (block(x) >= 0).all()  # relu(residual + shortcut): never negative
    with torch.no_grad():
        block.bn2.weight.zero_()  # residual branch silenced (BN output = its bias, 0)
    assert torch.allclose(block(x), F.relu(block.shortcut(x)), atol=1e-6)
    if stride == 1:
        assert torch.allclose(block(x), F.relu(x))  # identity shortcut


class _ZeroGate(torch.nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


def _known_gate(eca):
    """ECA's 1-D conv set to its centre tap: every channel's gate is then sigmoid(its own mean)."""
    with torch.no_grad():
        eca.conv.weight.zero_()
        eca.conv.weight[0, 0, eca.conv.kernel_size[0] // 2] = 1.0


def _gated(y):
    return y + y * torch.sigmoid(y.mean(dim=(2, 3), keepdim=True))  # x + eca(x), with the known gate


def test_patch_merging_and_embedding_add_eca_as_a_residual():
    # x + eca(x): with a gate that outputs 0 the block passes its convolutions through unchanged
    x = torch.randn(2, 8, 8, 12)
    merging = PatchMerging(8, 16)
    merging.eca = _ZeroGate()
    assert torch.allclose(merging(x), torch.cat([merging.conv2(x), merging.conv4(x)], dim=1))
    embed = PatchEmbed(8, 16)
    embed.eca = _ZeroGate()
    branches = torch.cat([conv(x) for conv in embed.convs], dim=1)
    expected = embed.norm(branches.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    assert torch.allclose(embed(x), expected, atol=1e-6)


def test_patch_merging_and_embedding_apply_eca_where_the_paper_does():
    """With a known gate: on the concatenated branches, before the embedding's LayerNorm (the zero-gate
    test above passes just as well without any ECA)."""
    x = torch.randn(2, 8, 8, 12)
    merging = PatchMerging(8, 16)
    _known_gate(merging.eca)
    assert torch.allclose(merging(x), _gated(torch.cat([merging.conv2(x), merging.conv4(x)], dim=1)), atol=1e-6)
    embed = PatchEmbed(8, 16)
    _known_gate(embed.eca)
    branches = _gated(torch.cat([conv(x) for conv in embed.convs], dim=1))
    expected = embed.norm(branches.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    assert torch.allclose(embed(x), expected, atol=1e-5)


@pytest.mark.parametrize("cls", [DFE, ASPPDFE])
def test_dfe_output_is_rectified_then_gated(cls):
    # attention(relu(...)): a ReLU map times a gate in (0, 1) is never negative, and it is zero where the ReLU is
    block = cls(8, (2, 3))
    x = torch.randn(2, 8, 8, 12)
    out = block(x)
    assert (out >= 0).all() and (out == 0).any() and (out > 0).any()
    if cls is DFE:  # one ReLU after the sum, not one per branch (which passes the check above too)
        block.eval()
        expected = block.attention(F.relu(sum(branch(x) for branch in block.branches)))
        assert torch.allclose(block(x), expected, atol=1e-6)


def test_drop_path_drops_whole_samples_in_training_only():
    torch.manual_seed(1)
    drop = DropPath(0.5)
    x = torch.ones(64, 3, 4, 4)
    out = drop(x)
    per_sample = out.flatten(1)
    kept = per_sample[:, 0] > 0
    assert 0 < kept.sum() < 64  # some samples dropped, some kept
    assert torch.all(per_sample[kept] == 2.0) and torch.all(per_sample[~kept] == 0.0)  # kept ones rescaled by 1/(1-p)
    drop.eval()
    assert torch.equal(drop(x), x)


def test_drop_path_keeps_a_sample_with_probability_one_minus_p():
    """At p = 0.5, as above, keeping with probability p or 1 - p is the same draw: at 0.2 most samples stay."""
    torch.manual_seed(0)
    out = DropPath(0.2)(torch.ones(4000, 1))
    kept = out[:, 0] > 0
    assert kept.float().mean().item() == pytest.approx(0.8, abs=0.03)
    assert torch.allclose(out[kept], torch.tensor(1.25))  # rescaled by 1 / (1 - p)


def test_swin_block_drops_both_residual_branches_in_training():
    # stochastic depth on the attention and on the MLP branch, drawn independently: with p = 0.5 about a
    # quarter of the samples lose both and come out unchanged; in eval none does
    torch.manual_seed(0)
    block = SwinBlock(16, 2, window_size=4, drop_path=0.5)
    x = torch.randn(64, 4, 4, 16)
    unchanged = (block(x) == x).flatten(1).all(1)
    assert 4 <= unchanged.sum() <= 30
    assert not (block.eval()(x) == x).flatten(1).all(1).any()


def test_window_partition_round_trip():
    x = torch.randn(2, 6, 8, 3)
    windows = window_partition(x, (3, 4))
    assert windows.shape == (2 * 2 * 2, 12, 3)
    assert torch.equal(windows[0], x[0, :3, :4].reshape(12, 3))  # first window of the first image
    assert torch.equal(window_reverse(windows, (3, 4), 6, 8), x)


def test_patch_embed_branch_kernels_and_split():
    embed = PatchEmbed(3, 64)
    assert [c.kernel_size[0] for c in embed.convs] == [2, 4, 8, 16]
    assert [c.out_channels for c in embed.convs] == [32, 16, 8, 8]
    assert all(c.stride == (2, 2) for c in embed.convs)
    # every branch is a module call, so hooks (Captum's layer methods) see it, channels_last too
    seen = []
    for conv in embed.convs:
        conv.register_forward_hook(lambda module, inputs, output: seen.append(tuple(output.shape)))
    embed.to(memory_format=torch.channels_last)(torch.randn(1, 3, 32, 32).contiguous(memory_format=torch.channels_last))
    assert seen == [(1, 32, 16, 16), (1, 16, 16, 16), (1, 8, 16, 16), (1, 8, 16, 16)]


def _reference_swin(block: SwinBlock, x: torch.Tensor) -> torch.Tensor:
    """Full attention over all tokens, restricted by an explicit 'same shifted window' rule."""
    B, H, W, C = x.shape
    window, shift, _ = block.window_layout(H, W)
    rows = torch.arange(H)[:, None].expand(H, W).flatten()
    cols = torch.arange(W)[None, :].expand(H, W).flatten()
    # in the unrolled image, shifted windows start at the shift; the first `shift` rows/cols form their own strip
    row_group = torch.div(rows - shift[0], window[0], rounding_mode="floor")
    col_group = torch.div(cols - shift[1], window[1], rounding_mode="floor")
    allowed = (row_group[:, None] == row_group[None, :]) & (col_group[:, None] == col_group[None, :])  # (HW, HW)
    attn = block.attn
    y = block.norm1(x).reshape(B, H * W, C)
    q, k, v = attn.qkv(y).reshape(B, H * W, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed).transpose(1, 2).reshape(B, H, W, C)
    x = x + attn.proj(out)
    return x + block.mlp(block.norm2(x))


@pytest.mark.parametrize("height, width, window_size, shift, layout", [
    # (window, shift, padded), worked out by hand: a side not larger than the window is global and never
    # shifted; a shifted side moves by half its window; a padded one still shifts
    (8, 8, 4, False, ((4, 4), (0, 0), (8, 8))), (8, 8, 4, True, ((4, 4), (2, 2), (8, 8))),
    (6, 10, 4, True, ((4, 4), (2, 2), (8, 12))), (6, 6, 4, False, ((4, 4), (0, 0), (8, 8))),
    (3, 5, 4, True, ((3, 4), (0, 2), (3, 8))), (4, 4, 4, True, ((4, 4), (0, 0), (4, 4))),
    (14, 14, 7, True, ((7, 7), (3, 3), (14, 14))),  # an odd window shifts by its lower half
])
def test_window_layouts(height, width, window_size, shift, layout):
    """The reference below takes its windows from window_layout, so the layouts are checked here on their own."""
    assert tuple(SwinBlock(16, 2, window_size, shift=shift).window_layout(height, width)) == layout


@pytest.mark.parametrize("height, width, window_size, shift", SWIN_SHAPES)
def test_swin_block_matches_explicit_window_rule(height, width, window_size, shift):
    # covers shifted windows, padding to a multiple of the window (masked out) and global windows
    block = SwinBlock(16, 2, window_size, shift=shift).eval()
    with torch.no_grad():  # two different LayerNorms: as built they are equal, and either could stand for the other
        for norm in (block.norm1, block.norm2):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_(0.0, 0.5)
    x = torch.randn(2, height, width, 16)
    assert torch.allclose(block(x), _reference_swin(block, x), atol=1e-5)


def test_swin_mlp_is_linear_gelu_linear():
    # the reference above reuses block.mlp: its activation is checked here (GELU, as in Swin)
    block = SwinBlock(16, 2, 4).eval()
    tokens = torch.randn(3, 16)
    fc1, fc2 = [m for m in block.mlp if isinstance(m, torch.nn.Linear)]
    assert torch.allclose(block.mlp(tokens), fc2(F.gelu(fc1(tokens))), atol=1e-6)


def _changed_by_corner(block, height, width, channels=16):
    """Which outputs change when the token at (0, 0) changes: a (H, W) bool map."""
    x = torch.randn(1, height, width, channels)
    x2 = x.clone()
    x2[0, 0, 0] += torch.randn(channels)  # not a constant: LayerNorm would remove it
    return (block(x2) - block(x)).abs().amax(dim=-1)[0] > 1e-6


def test_attention_is_local_when_the_map_is_larger_than_the_window():
    changed = _changed_by_corner(SwinBlock(16, 2, window_size=4).eval(), 8, 8)
    assert changed[:4, :4].all()
    assert not changed[4:].any() and not changed[:, 4:].any()


@pytest.mark.parametrize("window_size", [8, 16])
def test_attention_is_global_and_unshifted_when_the_map_fits_the_window(window_size):
    block = SwinBlock(16, 2, window_size=window_size, shift=True).eval()
    assert block.window_layout(8, 8) == ((8, 8), (0, 0), (8, 8))
    changed = _changed_by_corner(block, 8, 8)
    assert changed.all()  # the opposite corner (7, 7) too


def test_shifted_windows_straddle_the_unshifted_borders():
    block = SwinBlock(16, 2, window_size=4, shift=True).eval()
    # token (0, 0) lies in the 2x2 strip that the roll wraps round: it only sees that strip
    changed = _changed_by_corner(block, 8, 8)
    assert changed[:2, :2].all() and changed.sum() == 4
    # token (2, 2) sits in the shifted window rows 2..5, cols 2..5, across the unshifted border at 4
    x = torch.randn(1, 8, 8, 16)
    x2 = x.clone()
    x2[0, 2, 2] += torch.randn(16)
    changed = (block(x2) - block(x)).abs().amax(dim=-1)[0] > 1e-6
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[2:6, 2:6] = True
    assert torch.equal(changed, expected)


def test_shift_mask_is_a_buffer_for_the_training_size_and_computed_for_others():
    block = SwinBlock(16, 2, window_size=4, shift=True, input_resolution=(8, 8)).eval()
    assert block.attn_mask is not None and block.attn_mask.shape == (4, 1, 16, 16)
    assert "attn_mask" not in block.state_dict()  # derived from the size, not a learned value
    x = torch.randn(1, 12, 8, 16)  # another size: the mask is computed on the fly, same rule
    assert torch.allclose(block(x), _reference_swin(block, x), atol=1e-5)
    unshifted = SwinBlock(16, 2, window_size=4, input_resolution=(8, 8))
    assert unshifted.attn_mask is None  # aligned, unshifted windows need no mask


def test_a_non_square_training_size_uses_its_stored_mask_and_the_transposed_size_its_own(monkeypatch):
    block = SwinBlock(16, 2, window_size=4, shift=True, input_resolution=(8, 12)).eval()
    stored = block.attn_mask
    x = torch.randn(1, 12, 8, 16)  # the transposed size: its own mask (the stored one is of other windows)
    assert torch.allclose(block(x), _reference_swin(block, x), atol=1e-5)

    def recomputed(*args, **kwargs):
        raise AssertionError("the mask of the training size is stored, not computed again")

    monkeypatch.setattr(block, "attention_mask", recomputed)
    x = torch.randn(1, 8, 12, 16)
    assert stored is not None and torch.allclose(block(x), _reference_swin(block, x), atol=1e-5)


def test_disabled_dropout_is_not_built():
    """Dropout at 0 (every default) is nn.Identity: a printed model shows only the dropout it uses."""
    plain = SwinBlock(16, 2, window_size=4)
    assert not any(isinstance(m, nn.Dropout) for m in plain.modules())
    used = SwinBlock(16, 2, window_size=4, dropout=0.25)
    assert [m.p for m in used.modules() if isinstance(m, nn.Dropout)] == [0.25] * 3  # attention output, MLP twice
    assert dict(plain.named_parameters()).keys() == dict(used.named_parameters()).keys()  # checkpoints still load


def test_attention_dropout_only_in_training():
    attn = WindowAttention(16, 2, attn_dropout=0.5)
    x = torch.randn(4, 9, 16)
    attn.eval()
    assert torch.equal(attn(x), attn(x))
    attn.train()
    assert not torch.equal(attn(x), attn(x))
    # the output projection's dropout (`dropout`) zeroes whole outputs in training, half of them at p = 0.5
    projected = WindowAttention(16, 2, dropout=0.5)
    assert 0.3 < (projected(x) == 0).float().mean() < 0.7
    assert not (projected.eval()(x) == 0).any()


@pytest.mark.parametrize("dilations", [(6, 12, 18), (2, 3), (5,)])
@pytest.mark.parametrize("cls", [DFE, ASPPDFE])
def test_dfe_builds_one_branch_per_dilation(cls, dilations):
    block = cls(8, dilations)
    dilated = [m for m in block.branches.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert [m.dilation for m in dilated] == [(d, d) for d in dilations]
    assert all(m.padding == m.dilation for m in dilated)  # resolution kept


def _rows_changed_by_centre(block, size=41):
    """Along the centre column: which outputs change when the centre pixel changes."""
    x = torch.randn(1, 8, size, size)
    x2 = x.clone()
    x2[0, :, size // 2, size // 2] += 5.0
    diff = (block(x2) - block(x)).abs().amax(dim=(0, 1))  # (H, W)
    return diff[:, size // 2] > 1e-6


@pytest.mark.parametrize("cls", [DFE, ASPPDFE])
def test_dfe_receptive_field_follows_the_dilation(cls):
    # A 3x3 conv of dilation d taps offsets 0 and +-d; the 7x7 spatial attention widens each tap by +-3
    # (and ASPPDFE's 3x3 projection by +-1 more).
    torch.manual_seed(0)
    centre, spread = 20, 3 + (cls is ASPPDFE)
    changed = _rows_changed_by_centre(cls(8, (12,)).eval())
    assert changed[centre + 12] and changed[centre - 12] and changed[centre]
    assert not changed[centre + 6] and not changed[centre - 7]  # between the taps
    assert not changed[centre + 12 + spread + 1]  # beyond the widest tap
    changed = _rows_changed_by_centre(cls(8, (6,)).eval())
    assert changed[centre + 6] and changed[centre - 6]
    assert not changed[centre + 6 + spread + 1]


def test_stage_without_attention_builds_no_transformer():
    stage = ResFormerStage(8, 16, 2, cnn_depth=1, attn_depth=0, num_heads=2, window_size=4)
    assert stage.transformer is None and stage.merge is None
    assert not any(isinstance(m, (SwinBlock, PatchMerging)) for m in stage.modules())


def test_stage_fuses_the_two_paths_by_addition():
    stage = ResFormerStage(8, 16, 2, cnn_depth=1, attn_depth=1, num_heads=2, window_size=4).eval()
    x = torch.randn(2, 8, 8, 8)
    tokens = stage.merge(x).permute(0, 2, 3, 1)
    for block in stage.transformer:
        tokens = block(tokens)
    expected = stage.cnn(x) + stage.norm(tokens).permute(0, 3, 1, 2)
    assert torch.allclose(stage(x), expected, atol=1e-6)


# every (B, C, H, W) block of SHAPES, plus a stage with a shifted Swin block. Left out: drop path (the
# identity in eval mode)
CHANNELS_LAST = [s[:3] for s in SHAPES if s[0] != "drop path"] + [
    ("stage two swin blocks",
     lambda: ResFormerStage(8, 16, 2, cnn_depth=1, attn_depth=2, num_heads=2, window_size=4), (2, 8, 8, 8)),
]


@pytest.mark.parametrize("name, factory, in_shape", CHANNELS_LAST, ids=[c[0] for c in CHANNELS_LAST])
def test_blocks_keep_channels_last_and_bfloat16(name, factory, in_shape):
    block = factory().eval()
    x = torch.randn(in_shape)
    reference = block(x)
    fast = block.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(fast, reference, atol=1e-5)
    # still NHWC on the way out: a block that returns NCHW makes every following layer convert back
    assert fast.is_contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = block(x.contiguous(memory_format=torch.channels_last))
    assert low.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(low).all()
    assert torch.allclose(low.float(), reference, atol=0.15 * reference.abs().max().item())
