"""Task heads that read the encoder's four feature maps (H/2, H/4, H/8, H/16).

    UNetDecoder                    features -> (B, widths[0], H/2, W/2)   dense tasks share this shape
    SegmentationHead               decoder map -> (B, num_classes, H, W)  mask logits
    ReconstructionHead             decoder map -> (B, out_channels, H, W) denoised image
    MultiScaleClassificationHead   features -> (B, num_classes)           image-level logits

A dense task is a UNetDecoder followed by its head; every dense task gets its own decoder (see
mtl.py), so what the tasks share is exactly the encoder.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlearn.blocks import (
    ASPPDFE,
    DFE,
    dropout_layer,
)
from mtlearn.utils import check_int, check_int_sequence

DFE_MODES = ("none", "three", "four")  # no DFE, the paper's three-branch DFE, the four-branch ASPP-like one


def skip_refiner(mode: str, channels: int, dilations: Sequence[int] = (6, 12, 18)) -> nn.Module:
    """The module applied to one skip connection: nn.Identity, DFE ("three") or ASPPDFE ("four")."""
    if mode == "none":
        return nn.Identity()
    if mode == "three":
        return DFE(channels, dilations)
    if mode == "four":
        return ASPPDFE(channels, dilations)
    raise ValueError(f"unknown DFE mode {mode!r}; expected one of {DFE_MODES}")


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 convolution - BN - ReLU, resolution kept."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def check_maps(features: Sequence[Tensor], widths: tuple[int, ...], reader: str) -> None:
    """Refuse feature maps that are not one (B, widths[i], h, w) map per width: BatchNorm or a convolution
    would otherwise fail later with a bare RuntimeError about weights and channels."""
    if len(features) != len(widths):
        raise ValueError(f"{reader} was built for {len(widths)} encoder maps (channels {widths}), got {len(features)}")
    got = tuple(f.shape[1] if f.dim() == 4 else tuple(f.shape) for f in features)
    if got != widths:
        raise ValueError(f"{reader} expects (B, C, h, w) maps with channels {widths}, got {got}: the encoder's "
                         "widths must match the ones it was built with")


class UNetDecoder(nn.Module):
    """The ResFormer UNet decoder (Bui et al., 2024): up-convolve, concatenate the refined skip, convolve.

    The deepest encoder map (H/16) is the decoder input; there is no separate bottleneck. At each
    of the three levels: ConvTranspose2d (kernel 2, stride 2) doubles the resolution and halves
    the channels, the encoder map of that resolution is concatenated, and a 3x3 conv-BN-ReLU
    mixes the two (512 -> 256 -> 128 -> 64 at paper width). Skips carry the fine detail lost by
    downsampling; with `dfe` they are first refined by dilated feature enhancement, on all four
    encoder maps including the H/16 decoder input (the paper's "all four skips").

    widths: encoder channels per stage, e.g. (64, 128, 256, 512). Output: (B, widths[0], H/2, W/2).
    """

    def __init__(self, widths: Sequence[int], dfe: str = "none", dilations: Sequence[int] = (6, 12, 18)):
        super().__init__()
        # one width would make no up-sampling level: an identity
        widths = check_int_sequence("widths", widths, "the channels of each encoder stage, e.g. (64, 128, 256, 512)", 2)
        if dfe not in DFE_MODES:
            raise ValueError(f"unknown DFE mode {dfe!r}; expected one of {DFE_MODES}")
        self.widths, self.out_channels = widths, widths[0]
        self.refine = nn.ModuleList(skip_refiner(dfe, w, dilations) for w in widths)
        # level i turns widths[i + 1] channels at H/2^(i+2) into widths[i] channels at H/2^(i+1)
        self.up = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
                                for i in range(len(widths) - 1))
        self.fuse = nn.ModuleList(conv_bn_relu(2 * widths[i], widths[i]) for i in range(len(widths) - 1))

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """features: maps (B, widths[i], H / 2^(i+1), W / 2^(i+1)) -> (B, widths[0], H/2, W/2)."""
        check_maps(features, self.widths, "the decoder")
        skips = [refine(f) for refine, f in zip(self.refine, features)]
        x = skips[-1]  # (B, widths[-1], H/16, W/16)
        for i in reversed(range(len(self.up))):
            x = self.up[i](x)  # (B, widths[i], 2h, 2w)
            x = self.fuse[i](torch.cat([x, skips[i]], dim=1))  # (B, 2 widths[i], 2h, 2w) -> (B, widths[i], 2h, 2w)
        return x


class SegmentationHead(nn.Module):
    """Decoder map at H/2 -> per-pixel class logits at H (Bui et al.: bilinear x2 and a 1x1 convolution).

    A 1x1 convolution and bilinear upsampling commute (both are linear, and bilinear weights sum
    to one, so the bias passes through), so we apply the convolution first: it then runs on a
    quarter of the pixels. Logits feed a softmax over `num_classes` (2: background / lesion).
    """

    def __init__(self, in_channels: int, num_classes: int = 2):
        super().__init__()
        in_channels, num_classes = check_int("in_channels", in_channels, 1), check_int("num_classes", num_classes, 1)
        self.conv = nn.Conv2d(in_channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, h, w) -> (B, num_classes, 2h, 2w) logits."""
        return F.interpolate(self.conv(x), scale_factor=2, mode="bilinear", align_corners=False)


class ReconstructionHead(nn.Module):
    """Decoder map at H/2 -> an image at H: the denoising output of UMS-Rep (Zamzmi et al., 2021).

    UMS-Rep learns a modality's representation by denoising: the encoder must keep what the
    image shows and drop the speckle. The reconstruction is compared pixel by pixel, so unlike
    smooth mask logits it needs fine detail: a learned 2x up-convolution (kernel 2, stride 2)
    with ReLU, then a 1x1 convolution to `out_channels`. No skip from the input image: the output
    must be rebuilt from the encoder's features (otherwise the model could copy its input and the
    representation would learn nothing), and no output activation: the targets lie in 0..1, but a
    sigmoid would flatten the gradient of the darkest and brightest pixels, and the L1 loss and PSNR
    read the raw output.
    """

    def __init__(self, in_channels: int, out_channels: int = 1):
        super().__init__()
        in_channels, out_channels = check_int("in_channels", in_channels, 1), check_int("out_channels", out_channels, 1)
        hidden = max(in_channels // 2, 8)
        self.up = nn.ConvTranspose2d(in_channels, hidden, 2, stride=2)
        self.out = nn.Conv2d(hidden, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, h, w) -> (B, out_channels, 2h, 2w)."""
        return self.out(F.relu(self.up(x)))


class MultiScaleClassificationHead(nn.Module):
    """Image-level classifier on the last encoder stages (Bui et al., 2024: the multi-scale head).

    Each read map goes through BN -> ReLU -> global average pooling; the pooled vectors are
    concatenated (256 + 512 = 768 at paper width) -> Linear(768, 32) -> Linear(32, num_classes).
    Reading the H/8 stage as well as H/16 gives the classifier a finer view of the lesion.
    The two linear layers have no activation between them (as published): a rank-32 linear
    classifier. With `in_channels` of length 1 only the last stage is read (the "last" variant).

    in_channels: channels of the maps read, in encoder order, e.g. (256, 512); the head reads the
    last len(in_channels) maps of the feature list.
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int = 3, hidden: int = 32, dropout: float = 0.0):
        super().__init__()
        in_channels = check_int_sequence("in_channels", in_channels, "the channels of each map read, e.g. (256, 512)")
        num_classes, hidden = check_int("num_classes", num_classes, 1), check_int("hidden", hidden, 1)
        self.norms = nn.ModuleList(nn.BatchNorm2d(c) for c in in_channels)
        self.fc1 = nn.Linear(sum(in_channels), hidden)
        self.drop = dropout_layer("dropout", dropout)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """features: encoder maps (B, C_i, h_i, w_i), last len(in_channels) read -> (B, num_classes) logits."""
        widths = tuple(norm.num_features for norm in self.norms)
        if len(features) < len(widths):  # the slice below would read fewer maps, and BatchNorm fail on channels
            raise ValueError(f"the classification head reads the last {len(widths)} encoder maps (channels {widths}), "
                             f"got {len(features)} map(s)")
        read = features[len(features) - len(widths):]
        check_maps(read, widths, "the classification head")
        pooled = [F.relu(norm(f)).mean(dim=(2, 3)) for norm, f in zip(self.norms, read)]  # each (B, C_i)
        return self.fc2(self.drop(self.fc1(torch.cat(pooled, dim=1))))  # (B, sum C_i) -> (B, hidden) -> (B, classes)
