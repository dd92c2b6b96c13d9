"""Tests for mtlearn.heads: the UNet decoder and the task heads."""

import pytest
import torch
import torch.nn.functional as F

from mtlearn.blocks import ASPPDFE, DFE
from mtlearn.heads import (MultiScaleClassificationHead, ReconstructionHead, SegmentationHead, UNetDecoder,
                           skip_refiner)

WIDTHS = (8, 16, 32, 64)


def features(batch=2, height=32, width=32):
    """Encoder-shaped maps at H/2 ... H/16."""
    return [torch.randn(batch, w, height >> (i + 1), width >> (i + 1)) for i, w in enumerate(WIDTHS)]


@pytest.mark.parametrize("dfe", ["none", "three", "four"])
@pytest.mark.parametrize("height, width", [(32, 32), (32, 64)])
def test_decoder_shape(dfe, height, width):
    out = UNetDecoder(WIDTHS, dfe)(features(2, height, width))
    assert out.shape == (2, WIDTHS[0], height // 2, width // 2)
    assert torch.isfinite(out).all()


HEAD_SHAPES = [
    ("seg 2 classes", lambda: SegmentationHead(8, 2), (2, 8, 16, 24), (2, 2, 32, 48)),
    ("seg 4 classes", lambda: SegmentationHead(8, 4), (1, 8, 8, 8), (1, 4, 16, 16)),
    ("recon grey", lambda: ReconstructionHead(8, 1), (2, 8, 16, 24), (2, 1, 32, 48)),
    ("recon rgb", lambda: ReconstructionHead(8, 3), (1, 8, 8, 8), (1, 3, 16, 16)),
]


@pytest.mark.parametrize("name, factory, in_shape, out_shape", HEAD_SHAPES, ids=[h[0] for h in HEAD_SHAPES])
def test_dense_head_shapes(name, factory, in_shape, out_shape):
    assert factory()(torch.randn(in_shape)).shape == out_shape


@pytest.mark.parametrize("read, num_classes", [((32, 64), 3), ((64,), 2), ((16, 32, 64), 5)])
def test_classification_head_shape(read, num_classes):
    head = MultiScaleClassificationHead(read, num_classes)
    assert head.fc1.in_features == sum(read)
    assert head(features()).shape == (2, num_classes)


def test_classification_head_paper_sizes():
    head = MultiScaleClassificationHead((256, 512), num_classes=3)
    assert (head.fc1.in_features, head.fc1.out_features, head.fc2.out_features) == (768, 32, 3)


BAD_ARGUMENTS = [
    ("unknown dfe", lambda: UNetDecoder(WIDTHS, "five"), "DFE mode"),
    ("unknown refiner", lambda: skip_refiner("two", 8), "DFE mode"),
    ("seg no classes", lambda: SegmentationHead(8, 0), "num_classes"),
    ("recon no channels", lambda: ReconstructionHead(8, 0), "out_channels"),
    ("cls nothing read", lambda: MultiScaleClassificationHead((), 3), r"in_channels must list .*, at least 1, "
                                                                      r"got \(\)"),
    ("cls no classes", lambda: MultiScaleClassificationHead((64,), 0), "num_classes"),
    ("cls dropout 1", lambda: MultiScaleClassificationHead((64,), 3, dropout=1.0),
     r"dropout must be a number in \[0, 1\)"),
    # each failed inside torch ("empty(): argument 'size'", "'int' object is not iterable") or built silently
    ("seg float classes", lambda: SegmentationHead(16, 2.0), r"num_classes must be an integer >= 1, got 2.0"),
    ("seg bool classes", lambda: SegmentationHead(16, True), r"num_classes must be an integer >= 1, got True"),
    ("recon float channels", lambda: ReconstructionHead(16, 1.5), r"out_channels must be an integer >= 1, got 1.5"),
    ("cls float classes", lambda: MultiScaleClassificationHead((64, 128), 3.0), r"num_classes must be an integer"),
    ("cls float hidden", lambda: MultiScaleClassificationHead((64,), 3, hidden=32.0), r"hidden must be an integer"),
    ("cls one int", lambda: MultiScaleClassificationHead(128, 3), r"in_channels must list the channels of each map"),
    ("cls float width", lambda: MultiScaleClassificationHead((64.0,), 3), r"each of in_channels must be an integer"),
    ("decoder one width", lambda: UNetDecoder((16,)), r"widths must list the channels of each encoder stage, e.g. "
                                                      r"\(64, 128, 256, 512\), at least 2, got \(16,\)"),
    # maps that do not fit: were a bare RuntimeError from BatchNorm or a convolution, or a zip that stopped short
    ("decoder short list", lambda: UNetDecoder(WIDTHS)(features()[:3]),
     r"the decoder was built for 4 encoder maps \(channels \(8, 16, 32, 64\)\), got 3"),
    ("decoder channels", lambda: UNetDecoder(WIDTHS)(features()[::-1]),
     r"the decoder expects \(B, C, h, w\) maps with channels \(8, 16, 32, 64\), got \(64, 32, 16, 8\)"),
    ("cls too few maps", lambda: MultiScaleClassificationHead((16, 32, 64), 3)(features()[-2:]),
     r"reads the last 3 encoder maps \(channels \(16, 32, 64\)\), got 2 map\(s\)"),
    ("cls channels", lambda: MultiScaleClassificationHead((32, 64), 3)(features()[:2]),
     r"the classification head expects .* channels \(32, 64\), got \(8, 16\)"),
    ("cls flat map", lambda: MultiScaleClassificationHead((64,), 3)([torch.randn(2, 64)]),
     r"channels \(64,\), got \(\(2, 64\),\)"),
]


@pytest.mark.parametrize("name, factory, message", BAD_ARGUMENTS, ids=[b[0] for b in BAD_ARGUMENTS])
def test_bad_arguments(name, factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


@pytest.mark.parametrize("dfe, cls", [("none", torch.nn.Identity), ("three", DFE), ("four", ASPPDFE)])
def test_decoder_refines_all_four_skips(dfe, cls):
    decoder = UNetDecoder(WIDTHS, dfe, dilations=(2, 4))
    assert [type(r) for r in decoder.refine] == [cls] * 4
    if dfe != "none":
        assert all(r.dilations == (2, 4) for r in decoder.refine)


def test_decoder_uses_every_skip():
    decoder = UNetDecoder(WIDTHS).eval()
    maps = features(1)
    reference = decoder(maps)
    for level in range(4):
        changed = [m.clone() for m in maps]
        changed[level] += 1.0
        assert not torch.allclose(decoder(changed), reference)


def test_classification_head_reads_only_the_last_stages():
    head = MultiScaleClassificationHead((32, 64), 3).eval()
    maps = features(2)
    reference = head(maps)
    earlier = [maps[0] + 1.0, maps[1] - 1.0, maps[2], maps[3]]
    assert torch.equal(head(earlier), reference)
    later = [maps[0], maps[1], maps[2] + torch.randn_like(maps[2]), maps[3]]
    assert not torch.allclose(head(later), reference)


def test_segmentation_head_convolution_commutes_with_upsampling():
    head = SegmentationHead(8, 3)
    x = torch.randn(2, 8, 6, 10)
    upsampled_first = head.conv(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
    assert torch.allclose(head(x), upsampled_first, atol=1e-5)


def test_classification_head_is_bn_relu_average_pool_then_two_linear_layers():
    # eval mode with fresh running statistics (mean 0, var 1): BN is the identity up to its eps
    head = MultiScaleClassificationHead((32, 64), 3).eval()
    maps = features(2)
    scale = (1 + head.norms[0].eps) ** -0.5
    pooled = torch.cat([F.relu(maps[2] * scale).mean(dim=(2, 3)), F.relu(maps[3] * scale).mean(dim=(2, 3))], dim=1)
    expected = pooled @ head.fc1.weight.T + head.fc1.bias
    expected = expected @ head.fc2.weight.T + head.fc2.bias  # no activation between the two layers
    assert torch.allclose(head(maps), expected, atol=1e-5)


def test_classification_head_rectifies_after_batchnorm_not_before():
    # trained statistics and affine terms (a negative shift), where BN is far from the identity: relu(bn(x))
    torch.manual_seed(0)
    head = MultiScaleClassificationHead((32, 64), 3).eval()
    for norm in head.norms:
        for name in ("running_mean", "weight", "bias"):
            getattr(norm, name).data = torch.randn(norm.num_features)
        norm.running_var.data = torch.rand(norm.num_features) + 0.5
    maps = features(2)
    pooled = torch.cat([F.relu(norm(f)).mean(dim=(2, 3)) for norm, f in zip(head.norms, maps[2:])], dim=1)
    expected = head.fc2(head.fc1(pooled))
    assert torch.allclose(head(maps), expected, atol=1e-5)


def test_reconstruction_head_rectifies_its_hidden_layer():
    # up-convolution -> ReLU -> 1x1 convolution: a hidden layer pushed below zero leaves only the output bias
    head = ReconstructionHead(8, 1)
    with torch.no_grad():
        head.up.bias.fill_(-1e3)
        head.out.bias.fill_(0.25)
    assert torch.equal(head(torch.randn(2, 8, 4, 4)), torch.full((2, 1, 8, 8), 0.25))


class _Zero(torch.nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_decoder_uses_each_refined_map_not_the_raw_one(level):
    """The H/16 map (level 3) is refined like every skip before the decoder starts from it, and each level
    fuses its refined skip: a decoder that concatenated the raw map there would throw the DFE's work away."""
    decoder = UNetDecoder(WIDTHS).eval()
    maps = features(1)
    unrefined = decoder(maps)  # dfe "none": each refiner passes its map on
    decoder.refine[level] = _Zero()
    zeroed = [torch.zeros_like(m) if i == level else m for i, m in enumerate(maps)]
    assert torch.equal(decoder(maps), decoder(zeroed))
    assert not torch.equal(decoder(maps), unrefined)  # and the level's map counts at all


def test_classification_head_dropout_acts_on_the_hidden_layer_not_the_logits():
    torch.manual_seed(0)
    head = MultiScaleClassificationHead((32, 64), 3, dropout=0.5).train()
    with torch.no_grad():
        head.fc2.bias.fill_(5.0)
    maps = features(64)
    logits = head(maps)
    assert not (logits == 0).any()  # dropped hidden units still leave fc2's bias; dropout on logits zeroes half
    assert not torch.equal(logits, head(maps))  # and it is active in training


@pytest.mark.parametrize("in_channels, hidden", [(64, 32), (16, 8), (8, 8)])
def test_reconstruction_head_halves_its_input_channels_down_to_eight(in_channels, hidden):
    head = ReconstructionHead(in_channels, 1)
    assert head.up.out_channels == hidden and head.out.in_channels == hidden

