"""The ResFormer encoder (Bui et al., arXiv 2412.00351, 2024): a ResNet-34 and a Swin transformer side by side.

    encoder = ResFormerEncoder(ResFormerConfig(in_channels=1, image_size=128))
    features = encoder(images)   # four maps at H/2, H/4, H/8, H/16

The encoder only computes features; heads (segmentation decoder, classifier, ...) live in
heads.py and read the list it returns (features separate from heads, like timm's
`forward_features`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mtlearn.blocks import PatchEmbed, ResFormerStage, check_window_size, mlp_hidden
from mtlearn.utils import check_bool, check_number, check_size, is_int

STRIDE = 16  # the deepest feature map is H/16 x W/16: inputs must be divisible by this


@dataclass
class ResFormerConfig:
    """Encoder hyper-parameters. The defaults are the paper's (ResFormer "parallel", 224 px)."""

    in_channels: int = 1  # image channels: 1 (grey ultrasound) or 3 (RGB); any positive int works
    image_size: int | tuple[int, int] = 224  # training size in pixels, side or (H, W); sets the window and masks
    widths: tuple[int, ...] = (64, 128, 256, 512)  # channels of the four stages at H/2, H/4, H/8, H/16
    cnn_depths: tuple[int, ...] = (3, 4, 6, 3)  # BasicBlocks per stage (ResNet-34 layout)
    attn_depths: tuple[int, ...] = (2, 2, 2, 2)  # Swin blocks per stage; every second one is shifted
    num_heads: tuple[int, ...] = (2, 4, 8, 16)  # attention heads per stage (head dim = width / heads = 32)
    mlp_ratio: float = 4.0  # hidden size of each transformer MLP, as a multiple of the width
    window_size: int | None = None  # attention window side in tokens; None -> min(image_size) // 16
    # (square windows: on a non-square image the H/16 stage is global along its shorter side only)
    qkv_bias: bool = True  # learn a bias for the query/key/value projection
    drop_path: float = 0.1  # stochastic depth, rising linearly from 0 to this over the Swin blocks
    dropout: float = 0.0  # dropout after attention projections and MLPs (and before the classifier's last layer)
    attn_dropout: float = 0.0  # dropout on attention weights, training only
    use_attention: bool = True  # False: no transformer path at all -> a plain ResNet-34-style encoder

    def __post_init__(self):
        self.image_size = check_size(self.image_size)
        for name in ("qkv_bias", "use_attention"):
            setattr(self, name, check_bool(name, getattr(self, name)))
        for name in ("widths", "cnn_depths", "attn_depths", "num_heads"):
            values = tuple(getattr(self, name))
            # a float such as 512 / 16 = 32.0 passes every check below and then fails deep inside torch
            if not all(is_int(v) for v in values):
                raise ValueError(f"{name} must be ints, got {values}; pass ints: int(...) or // (e.g. 512 // 16)")
            setattr(self, name, tuple(int(v) for v in values))
        if not is_int(self.in_channels) or self.in_channels < 1:
            raise ValueError(f"in_channels must be a positive integer (1 grey, 3 RGB), got {self.in_channels!r}")
        if len(self.image_size) != 2 or any(s < STRIDE or s % STRIDE for s in self.image_size):
            nearest = tuple(STRIDE * max(1, round(side / STRIDE)) for side in self.image_size)
            raise ValueError(f"image_size must be a multiple of the network stride {STRIDE} (e.g. 128 or 224), "
                             f"got {self.image_size}" + (f"; the nearest: {nearest}" if len(nearest) == 2 else ""))
        lengths = {name: len(getattr(self, name)) for name in ("widths", "cnn_depths", "attn_depths", "num_heads")}
        if set(lengths.values()) != {4}:
            raise ValueError(f"widths, cnn_depths, attn_depths and num_heads need one entry per stage (4), "
                             f"got {lengths}")
        if self.widths[0] % 8 != 0 or any(w < 1 or w % 2 for w in self.widths):
            raise ValueError(f"widths must be even, the first a multiple of 8 (patch embedding split 4/2/1/1 "
                             f"eighths), e.g. (64, 128, 256, 512); got {self.widths}")
        if any(d < 1 for d in self.cnn_depths) or any(d < 0 for d in self.attn_depths):
            raise ValueError(f"cnn_depths must be >= 1 and attn_depths >= 0, "
                             f"got {self.cnn_depths} and {self.attn_depths}")
        for width, heads in zip(self.widths, self.num_heads):
            if heads < 1 or width % heads != 0:
                raise ValueError(f"num_heads {self.num_heads} must divide widths {self.widths} stage by stage "
                                 f"(integer head dimension); {width} channels cannot be split into {heads} heads")
        if self.window_size is None:
            self.window_size = min(self.image_size) // STRIDE
        self.window_size = check_window_size(self.window_size)
        for name in ("drop_path", "dropout", "attn_dropout"):
            check_number(name, getattr(self, name), 0, 1, below=True, advice="a probability; 0: none")
        check_number("mlp_ratio", self.mlp_ratio, 0, above=True, advice="the MLP's width over the tokens', e.g. 4")
        attended = [w for w, d in zip(self.widths, self.attn_depths) if d > 0] if self.use_attention else []
        if attended:  # now, not when the narrowest stage with attention builds its MLP
            mlp_hidden(min(attended), self.mlp_ratio)


def check_floating(x: Tensor, name: str = "images") -> None:
    """Raise ValueError unless x is a floating-point tensor, naming the conversion.

    The model learned on images scaled to 0..1: a uint8 image (0..255) run through it, or through
    anything that converts it with a bare .float() (attribution), describes the model on inputs it
    never saw. Shared with attribution.Explainer so that both refuse them with the same advice.
    """
    if not x.is_floating_point():
        fix = ".float() / 255 (0..255 -> 0..1)" if x.dtype == torch.uint8 else ".float()"
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}; convert with {fix}")


def unscaled_range(x, data_range: float = 1.0) -> tuple[float, float] | None:
    """(lowest, highest) of a float image batch that looks like raw, unscaled intensities, else None.

    Images here are scaled to 0..1 (or z-scored, as the shapes benchmark is). Floats that are all
    >= 0 and reach past twice `data_range` are most likely raw pixel values (0..255 for 8-bit scans)
    that nobody divided by the scale's maximum: the networks run on them without a word. Anything
    else is None: uint8 (refused by check_floating), an empty batch, NaN or infinities (their own errors).
    """
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.numel() == 0:
        return None
    low, high = (float(v) for v in torch.aminmax(x.detach()))
    if not (math.isfinite(low) and math.isfinite(high)) or low < 0 or not high > 2 * data_range:
        return None
    return low, high


def _autocasting(x: Tensor) -> bool:
    """True inside torch.autocast for x's device type (there a layer casts its input itself)."""
    try:
        return torch.is_autocast_enabled(x.device.type)
    except (RuntimeError, TypeError):  # a device type without autocast
        return False


def check_image(x: Tensor, in_channels: int, stride: int = STRIDE, dtype: torch.dtype | None = None) -> None:
    """Raise ValueError unless x is a (B, in_channels, H, W) float batch with H and W divisible by `stride`.

    `dtype`: the model's weight dtype; outside torch.autocast a batch of another floating dtype is
    refused (conv layers would fail with "expected scalar type Double but found Float").
    """
    if not isinstance(x, Tensor):  # a whole batch dict, or a NumPy array, passed to model(...)
        fix = ("pass its image: model(batch['image'])" if isinstance(x, Mapping)
               else "convert it: torch.as_tensor(array).float()" if hasattr(x, "__array__") else "")
        raise TypeError(f"the model takes a batch of images, a tensor (B, C, H, W); got a {type(x).__name__}"
                        + (f"; {fix}" if fix else ""))
    if x.dim() != 4:
        fix = "; one image (C, H, W) becomes a batch of one with image[None]" if x.dim() == 3 else ""
        raise ValueError(f"expected a batch of images (B, C, H, W), got a tensor of shape {tuple(x.shape)}{fix}")
    check_floating(x)
    # under autocast the layers cast for themselves (float32, not float64: "expected scalar type Double but
    # found BFloat16"); outside it, conv layers fail with "expected scalar type Half but found Float" or
    # "Input type (CPUBFloat16Type) and weight type ... should be the same"
    if dtype is not None and x.dtype != dtype and (x.dtype == torch.float64 or not _autocasting(x)):
        convert = {torch.float32: ".float()", torch.float64: ".double()", torch.float16: ".half()",
                   torch.bfloat16: ".bfloat16()"}.get(dtype, f".to({dtype})")
        raise ValueError(f"images are {x.dtype} but the model's weights are {dtype}; convert with {convert}, or "
                         "run the model under torch.autocast for mixed precision")
    if x.shape[1] != in_channels and x.shape[-1] == in_channels:  # (B, H, W, C), as NumPy and PIL store pictures
        raise ValueError(f"the images have their channels last (shape {tuple(x.shape)}); the model takes (B, C, H, W): "
                         "use x.permute(0, 3, 1, 2)")
    if x.shape[1] != in_channels:
        raise ValueError(f"the model was built for {in_channels} input channel(s), got {x.shape[1]} "
                         f"(shape {tuple(x.shape)}); build it with in_channels={x.shape[1]}")
    H, W = x.shape[-2:]
    if H == 0 or W == 0:
        raise ValueError(f"the images are empty (size {H}x{W}, shape {tuple(x.shape)}); check how they were cropped")
    if H % stride or W % stride:
        nearest = "x".join(str(stride * max(1, round(side / stride))) for side in (H, W))
        raise ValueError(f"image size {H}x{W} is not divisible by the network stride {stride}; "
                         f"resize or pad each side to a multiple of {stride} (the nearest: {nearest})")


class ResFormerEncoder(nn.Module):
    """ResFormer encoder (Bui et al., 2024): a ResNet-34 CNN path and a Swin transformer path, fused per stage.

    Why two paths: convolutions are good at local texture and boundaries, attention at relating
    distant regions (a lesion and its surroundings). Bui et al. run both on the same input at
    every stage and add their outputs (the "parallel" variant); the sum feeds the next stage.

        stem:   conv 7x7 stride 1 - BN - ReLU - max-pool 3/2      (B, w0, H/2, W/2)
              + multi-scale patch embedding of the image          (B, w0, H/2, W/2)
        stage i (i = 1..4): BasicBlocks + Swin blocks, added      (B, w_i, H/2^i, W/2^i)

    With `use_attention=False` neither the patch embedding nor any transformer block is built:
    the encoder is then a plain ResNet-34 (with a stride-1 stem), the single-path baseline.
    """

    def __init__(self, config: ResFormerConfig):
        super().__init__()
        self.config = config
        self.out_channels = list(config.widths)  # channels of the four returned maps
        self.strides = [2, 4, 8, 16]  # their downsampling factors
        widths = config.widths
        attn_depths = config.attn_depths if config.use_attention else (0, 0, 0, 0)

        self.stem = nn.Sequential(
            nn.Conv2d(config.in_channels, widths[0], 7, padding=3, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        self.patch_embed = PatchEmbed(config.in_channels, widths[0]) if config.use_attention else None

        # stochastic depth rises linearly over all transformer blocks of the encoder
        total = sum(attn_depths)
        rates = [config.drop_path * i / max(total - 1, 1) for i in range(total)]
        H, W = config.image_size
        self.stages = nn.ModuleList()
        for i in range(4):
            first = sum(attn_depths[:i])
            self.stages.append(ResFormerStage(
                in_channels=widths[max(i - 1, 0)], out_channels=widths[i], stride=1 if i == 0 else 2,
                cnn_depth=config.cnn_depths[i], attn_depth=attn_depths[i], num_heads=config.num_heads[i],
                window_size=config.window_size, mlp_ratio=config.mlp_ratio, qkv_bias=config.qkv_bias,
                dropout=config.dropout, attn_dropout=config.attn_dropout,
                drop_path=rates[first:first + attn_depths[i]], input_resolution=(H >> (i + 1), W >> (i + 1)),
            ))
        self.apply(init_weights)

    def forward(self, x: Tensor) -> list[Tensor]:
        """x: (B, in_channels, H, W) -> 4 maps (B, widths[i], H / 2^(i+1), W / 2^(i+1)), i = 0..3."""
        check_image(x, self.config.in_channels, dtype=self.stem[0].weight.dtype)
        if self.training and x.shape[0] * (x.shape[-2] // STRIDE) * (x.shape[-1] // STRIDE) == 1:
            # torch's own message ("Expected more than 1 value per channel") names neither cause nor fix
            raise ValueError(f"one {x.shape[-2]}x{x.shape[-1]} image in training mode leaves BatchNorm a single value "
                             f"per channel in the last stage ({STRIDE}x smaller); train on batches of 2 or more "
                             "images (or larger images), or call model.eval() to run it on one")
        features = self.stem(x)  # (B, w0, H/2, W/2)
        if self.patch_embed is not None:
            features = features + self.patch_embed(x)
        outputs = []
        for stage in self.stages:
            features = stage(features)
            outputs.append(features)
        return outputs


def init_weights(module: nn.Module) -> None:
    """He init for 2-D convolutions (ResNet), truncated normal for linear layers (Swin), unit norms.

    Transposed convolutions (the decoders' up-sampling) and ECA's 1-D convolution keep PyTorch's
    default (Kaiming-uniform with a = sqrt(5)).
    """
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
