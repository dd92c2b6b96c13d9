"""Building blocks of the ResFormer multi-task UNet (Bui et al., arXiv 2412.00351, 2024).

Read top-down: the two attention gates (channel, spatial), the CNN block, the Swin transformer
parts (window helpers, window attention, the block), patch embedding and merging, the two-path
ResFormer stage that fuses a CNN and a transformer by addition, and the DFE that refines skips.

Convolutional parts take and return (B, C, H, W) maps. The transformer parts work on
channels-last (B, H, W, C) maps, so a LayerNorm or Linear acts on the last dimension directly;
when the network runs in `torch.channels_last` memory format the permutes between the two
layouts cost nothing.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlearn.utils import check_int, check_int_sequence, check_number, is_int

# Additive attention mask value for token pairs that must not attend to each other.
MASKED = float("-inf")


# ---------------------------------------------------------------------------------------------
# Attention gates
# ---------------------------------------------------------------------------------------------


class ECA(nn.Module):
    """Efficient channel attention (Wang et al., "ECA-Net", CVPR 2020): x * sigmoid(conv1d(GAP(x))).

    ResFormer gates its patch embedding and patch merging outputs with ECA. ECA is the cheap form
    of squeeze-and-excitation: instead of two fully connected layers over all channels, one 1-D
    convolution of width `kernel_size` lets each channel's gate look at its neighbours only, which
    costs `kernel_size` weights and avoids squeezing the channels through a bottleneck.
    """

    def __init__(self, kernel_size: int = 3):
        super().__init__()
        if not is_int(kernel_size) or kernel_size < 1 or kernel_size % 2 == 0:  # 3.0 failed inside Conv1d
            raise ValueError(f"ECA kernel_size must be a positive odd integer, got {kernel_size!r}")
        self.conv = nn.Conv1d(1, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> (B, C, H, W), every channel scaled by its own gate in (0, 1)."""
        pooled = x.mean(dim=(2, 3)).unsqueeze(1)  # (B, 1, C): global average pool, channels as a sequence
        gate = torch.sigmoid(self.conv(pooled)).squeeze(1)  # (B, C)
        return x * gate[:, :, None, None]


class SpatialAttention(nn.Module):
    """Spatial attention of CBAM (Woo et al., ECCV 2018): where in the image to look.

    ResFormer ends its DFE with it: the channel mean and channel max at every pixel summarise
    "how much is happening here"; a 7x7 convolution turns those two maps into a gate in (0, 1)
    that keeps the lesion region and damps the background of the skip features.
    """

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        if not is_int(kernel_size) or kernel_size < 1 or kernel_size % 2 == 0:  # 7.0 failed inside Conv2d
            raise ValueError(f"SpatialAttention kernel_size must be a positive odd integer, got {kernel_size!r}")
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> (B, C, H, W), every pixel scaled by one gate shared by its channels."""
        summary = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)  # (B, 2, H, W)
        return x * torch.sigmoid(self.conv(summary))


# ---------------------------------------------------------------------------------------------
# CNN path
# ---------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """ResNet basic block (He et al., CVPR 2016): relu(bn(conv(relu(bn(conv(x))))) + shortcut(x)).

    The CNN path of every ResFormer stage is a stack of these, in ResNet-34's [3, 4, 6, 3] layout.
    Two 3x3 convolutions see local texture and edges; the identity shortcut lets gradients reach
    early layers unchanged. When the block changes the channel count or strides, the shortcut
    becomes a 1x1 convolution + BN so the two terms have the same shape.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"BasicBlock stride must be 1 or 2, got {stride}")
        in_channels, out_channels = check_int("in_channels", in_channels, 1), check_int("out_channels", out_channels, 1)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C_in, H, W) -> (B, C_out, H / stride, W / stride)."""
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


# ---------------------------------------------------------------------------------------------
# Transformer path: Swin blocks (Liu et al., "Swin Transformer", ICCV 2021)
# ---------------------------------------------------------------------------------------------


def drop_rate(name: str, value) -> float:
    """A drop(-path) probability in [0, 1) as a float, or a ValueError naming `name`; a one-element tensor is
    taken as its number (the items of torch.linspace(0, 0.1, depth), as timm builds the rates)."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    return check_number(name, value, 0.0, 1.0, below=True)


def dropout_layer(name: str, p) -> nn.Module:
    """nn.Dropout(p), or nn.Identity() when p is 0 (the default): a disabled part is not built, so a
    printed model shows only the dropout it uses. `p` is checked as `drop_rate` does, naming `name`."""
    p = drop_rate(name, p)
    return nn.Dropout(p) if p > 0 else nn.Identity()


class DropPath(nn.Module):
    """Stochastic depth (Huang et al., ECCV 2016): drop a residual branch for whole samples.

    In training each sample keeps the branch with probability 1 - p, rescaled by 1 / (1 - p) so
    the expected output is unchanged; in eval the branch is always kept. ResFormer's transformer
    blocks use rates rising linearly from 0 to 0.1 with depth, so deep blocks are dropped more.
    """

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_rate("drop_prob", drop_prob)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, ...) -> (B, ...), whole samples zeroed (training only)."""
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        scale = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep).div_(keep)  # (B, 1, ...)
        return x * scale

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def window_partition(x: Tensor, window: tuple[int, int]) -> Tensor:
    """Cut a map into non-overlapping windows: (B, H, W, C) -> (B * nW, wh * ww, C).

    H and W must be multiples of the window (wh, ww); the nW = (H / wh) * (W / ww) windows of each
    image come out in row-major order.
    """
    B, H, W, C = x.shape
    wh, ww = window
    x = x.reshape(B, H // wh, wh, W // ww, ww, C)  # (B, nH, wh, nW_, ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, wh * ww, C)  # (B * nW, wh * ww, C)


def window_reverse(windows: Tensor, window: tuple[int, int], height: int, width: int) -> Tensor:
    """Inverse of window_partition: (B * nW, wh * ww, C) -> (B, H, W, C)."""
    wh, ww = window
    C = windows.shape[-1]
    x = windows.reshape(-1, height // wh, width // ww, wh, ww, C)  # (B, nH, nW_, wh, ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, C)  # (B, H, W, C)


def window_attention_mask(size: tuple[int, int], padded: tuple[int, int], window: tuple[int, int],
                          shift: tuple[int, int], device: torch.device | None = None) -> Tensor:
    """Additive mask (nW, 1, N, N) for shifted and/or padded windows: 0 = may attend, -inf = may not.

    size: (H, W) of the real map; padded: (Hp, Wp) after zero padding to a multiple of the window;
    shift: (sh, sw) of the cyclic roll. Every position gets a region label in the unrolled frame:
    the first sh rows / sw columns wrap round to the far side when rolled, so they form their own
    regions; padding gets a region of its own. After the same roll as the features, two tokens
    of one window may attend to each other only if their labels match.
    """
    (H, W), (Hp, Wp), (sh, sw) = size, padded, shift
    rows = torch.arange(Hp, device=device)
    cols = torch.arange(Wp, device=device)
    labels = (rows < sh).long()[:, None] * 2 + (cols < sw).long()[None, :]  # (Hp, Wp), values 0..3
    is_padding = (rows >= H)[:, None] | (cols >= W)[None, :]
    labels = labels.masked_fill(is_padding, -1)
    labels = torch.roll(labels, shifts=(-sh, -sw), dims=(0, 1))
    labels = window_partition(labels[None, :, :, None], window).squeeze(-1)  # (nW, N)
    different = labels[:, :, None] != labels[:, None, :]  # (nW, N, N)
    return torch.zeros(different.shape, device=device).masked_fill(different, MASKED).unsqueeze(1)  # (nW, 1, N, N)


class WindowLayout(NamedTuple):
    """How a SwinBlock tiles an (H, W) map."""

    window: tuple[int, int]  # (wh, ww): window_size, or the whole side when the map is not larger
    shift: tuple[int, int]  # (sh, sw): cyclic roll, half a window in shifted blocks, else 0
    padded: tuple[int, int]  # (Hp, Wp): size after zero padding to a multiple of the window


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window (Liu et al., "Swin Transformer", ICCV 2021).

    Attention inside windows of window_size x window_size tokens costs O(N * window_size^2)
    instead of O(N^2) for the whole map. It is computed by F.scaled_dot_product_attention, which
    picks a fused kernel where one is available (attention dropout only in training).

    No relative position bias (Swin has one): a learned bias added to the attention logits needs
    a gradient through the mask, which SDPA computes on a slower path on CPU (the attention op,
    forward and backward, 1.4-2x slower for 8x8 to 14x14 windows, measured with torch 2.13). A
    speed choice with a cost: without it, attention inside a window weighs the keys by their
    content alone, not by where they sit relative to the query (convolutional tokens carry
    position only near zero-padded borders). The CNN path, added back at every stage, supplies the
    local spatial structure.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_dropout: float = 0.0,
                 dropout: float = 0.0):
        super().__init__()
        dim = check_int("dim", dim, 1)  # 64.0 failed inside nn.Linear
        if not is_int(num_heads) or num_heads < 1 or dim % num_heads != 0:  # 2.0 heads passed, then failed in reshape
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads!r} (integer head dimension); "
                             "pass an int that divides dim, e.g. dim // 32 for 32-channel heads")
        self.num_heads = num_heads
        self.attn_dropout = drop_rate("attn_dropout", attn_dropout)  # 1.5 built, then failed in the first forward
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = dropout_layer("dropout", dropout)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x: (B * nW, N, C) tokens of nW windows per image, mask: (nW, 1, N, N) additive or None -> (B * nW, N, C)."""
        BW, N, C = x.shape
        qkv = self.qkv(x).reshape(BW, N, 3, self.num_heads, C // self.num_heads)  # (B * nW, N, 3, heads, head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B * nW, heads, N, head_dim)
        if mask is not None:
            # one mask per window, the same for every image: (nW, 1, N, N) -> (B * nW, 1, N, N)
            mask = mask.to(q.dtype).repeat(BW // mask.shape[0], 1, 1, 1)
        dropout_p = self.attn_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)  # (B * nW, heads, N, hd)
        out = out.transpose(1, 2).reshape(BW, N, C)  # (B * nW, N, C)
        return self.proj_drop(self.proj(out))


def check_window_size(window_size) -> int:
    """`window_size` as an int >= 1 (tokens per window side), or a ValueError with the fix: a float
    such as 64 / 16 = 4.0 builds, then fails in window_partition's reshape."""
    if not is_int(window_size) or window_size < 1:
        raise ValueError(f"window_size must be an int >= 1 (tokens per window side), got {window_size!r}; "
                         "pass an int, e.g. image_size // 16")
    return int(window_size)


def mlp_hidden(dim: int, mlp_ratio: float) -> int:
    """Hidden units of a `dim`-channel Swin MLP, int(dim * mlp_ratio), or a ValueError when that is 0:
    an MLP without hidden units builds with only a torch warning, and learns nothing."""
    hidden = int(dim * mlp_ratio)
    if hidden < 1:
        raise ValueError(f"mlp_ratio {mlp_ratio} x {dim} channels gives the MLP {hidden} hidden units; use an "
                         f"mlp_ratio of at least 1 / {dim} (the paper: 4.0)")
    return hidden


class SwinBlock(nn.Module):
    """Swin transformer block (Liu et al., ICCV 2021): x + attn(norm(x)), then x + mlp(norm(x)).

    Attention runs inside non-overlapping windows. In a shifted block (every second block) the map
    is first rolled by half a window, so the new windows straddle the old window borders and
    information flows between neighbouring windows; a mask stops tokens that the roll brought
    together from opposite image borders from attending to each other.

    ResFormer's rule for small maps: when the map is not larger than the window (e.g. the H/16
    stage, where window = image_size // 16 equals the map), the window shrinks to the whole map,
    attention is global and the shift is switched off (it would only wrap the image round).
    Other sizes are zero-padded to a multiple of the window and the padding is masked out, so any
    input size divisible by the network stride works.

    input_resolution: the (H, W) the block expects in training; its shift/padding mask is then
    precomputed once as a buffer. Other sizes get their mask computed on the fly.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, shift: bool = False, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, dropout: float = 0.0, attn_dropout: float = 0.0, drop_path: float = 0.0,
                 input_resolution: tuple[int, int] | None = None):
        super().__init__()
        check_window_size(window_size)
        dim = check_int("dim", dim, 1)
        drop_path = drop_rate("drop_path", drop_path)  # -0.1 built a block without it
        hidden = mlp_hidden(dim, mlp_ratio)
        self.window_size = window_size
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, qkv_bias, attn_dropout, dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), dropout_layer("dropout", dropout), nn.Linear(hidden, dim),
            dropout_layer("dropout", dropout),
        )
        # the shift/padding mask for the training resolution, computed once (None: not needed there)
        self.mask_resolution = input_resolution
        self.register_buffer("attn_mask", None if input_resolution is None else self.attention_mask(*input_resolution),
                             persistent=False)

    def window_layout(self, height: int, width: int) -> WindowLayout:
        """How a (height, width) map is tiled; global attention when it is not larger than the window."""
        window = (min(self.window_size, height), min(self.window_size, width))
        shift = tuple(w // 2 if self.shift and size > w else 0 for size, w in zip((height, width), window))
        padded = (height + (-height) % window[0], width + (-width) % window[1])
        return WindowLayout(window, shift, padded)

    def attention_mask(self, height: int, width: int, device: torch.device | None = None) -> Tensor | None:
        """(nW, 1, N, N) mask for a (height, width) map, or None when the windows need none."""
        layout = self.window_layout(height, width)
        if layout.shift == (0, 0) and layout.padded == (height, width):
            return None
        return window_attention_mask((height, width), layout.padded, layout.window, layout.shift, device)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        B, H, W, C = x.shape
        window, (sh, sw), (Hp, Wp) = self.window_layout(H, W)
        if (H, W) == self.mask_resolution:
            mask = self.attn_mask
        else:
            mask = self.attention_mask(H, W, x.device)

        # attention in (shifted) windows
        y = self.norm1(x)
        if (Hp, Wp) != (H, W):
            y = F.pad(y, (0, 0, 0, Wp - W, 0, Hp - H))  # zero-pad bottom and right: (B, Hp, Wp, C)
        if sh or sw:
            y = torch.roll(y, shifts=(-sh, -sw), dims=(1, 2))
        y = self.attn(window_partition(y, window), mask)  # (B * nW, N, C)
        y = window_reverse(y, window, Hp, Wp)  # (B, Hp, Wp, C)
        if sh or sw:
            y = torch.roll(y, shifts=(sh, sw), dims=(1, 2))
        if (Hp, Wp) != (H, W):
            y = y[:, :H, :W]
        x = x + self.drop_path(y)

        # per-token MLP
        return x + self.drop_path(self.mlp(self.norm2(x)))


# ---------------------------------------------------------------------------------------------
# Entering and moving between transformer stages
# ---------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """ResFormer's multi-scale patch embedding: four parallel stride-2 convolutions of kernel 2, 4, 8, 16.

    A ViT cuts the image into patches of one size; here four kernel sizes see 2 to 16 pixels
    around each position, so the first transformer tokens already mix fine detail and context.
    Channels are split 1/2, 1/4, 1/8, 1/8 (32/16/8/8 of 64 in the paper): most capacity for the
    finest kernel. The concatenation is re-weighted by ECA (residual: x + eca(x)) and normalised
    by LayerNorm. Output is H/2, the resolution of the CNN stem it is added to.
    """

    KERNELS = (2, 4, 8, 16)
    SHARES = (4, 2, 1, 1)  # eighths of out_channels per kernel: 1/2, 1/4, 1/8, 1/8

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        in_channels, out_channels = check_int("in_channels", in_channels, 1), check_int("out_channels", out_channels, 1)
        if out_channels % 8 != 0:
            raise ValueError(f"PatchEmbed out_channels must be a multiple of 8 (split 4/2/1/1 eighths), "
                             f"got {out_channels}")
        # padding (k - 2) / 2 makes every branch output exactly H/2 x W/2
        self.convs = nn.ModuleList(
            _ContiguousConv2d(in_channels, out_channels * share // 8, k, stride=2, padding=(k - 2) // 2)
            for k, share in zip(self.KERNELS, self.SHARES)
        )
        self.eca = ECA()
        self.norm = nn.LayerNorm(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C_in, H, W) -> (B, C_out, H/2, W/2)."""
        x = torch.cat([conv(x) for conv in self.convs], dim=1)  # (B, C_out, H/2, W/2)
        x = x + self.eca(x)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, H/2, W/2, C) for LayerNorm over channels


class _ContiguousConv2d(nn.Conv2d):
    """A Conv2d that runs in the default (NCHW) layout even inside a channels_last model.

    Why: on CPU, oneDNN's channels_last backward of PatchEmbed's k=16 stride-2 convolution on a
    3-channel image was ~30x slower (torch 2.13). The copies are of the input image and a few
    thousand weights: cheap. Being a module call (not F.conv2d), hooks (Captum's layer methods,
    randomisation checks) see it like any other layer.
    """

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C_in, H, W), any memory format -> (B, C_out, H', W') contiguous, as nn.Conv2d computes."""
        return F.conv2d(x.contiguous(), self.weight.contiguous(), self.bias, self.stride, self.padding)


class PatchMerging(nn.Module):
    """ResFormer's patch merging: halve the resolution with two stride-2 convolutions (k=2 and k=4).

    Swin merges 2x2 tokens by concatenation and a linear layer, which is exactly a k=2, stride-2
    convolution; ResFormer adds a k=4 branch that overlaps neighbouring patches, concatenates the
    two (half the output channels each) and gates the result with ECA (residual).
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        in_channels, out_channels = check_int("in_channels", in_channels, 1), check_int("out_channels", out_channels, 1)
        if out_channels % 2 != 0:
            raise ValueError(f"PatchMerging out_channels must be even (two halves), got {out_channels}")
        self.conv2 = nn.Conv2d(in_channels, out_channels // 2, 2, stride=2)
        self.conv4 = nn.Conv2d(in_channels, out_channels // 2, 4, stride=2, padding=1)
        self.eca = ECA()

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C_in, H, W) -> (B, C_out, H/2, W/2)."""
        x = torch.cat([self.conv2(x), self.conv4(x)], dim=1)
        return x + self.eca(x)


# ---------------------------------------------------------------------------------------------
# One encoder stage: CNN and transformer side by side
# ---------------------------------------------------------------------------------------------


class ResFormerStage(nn.Module):
    """One ResFormer encoder stage: a CNN path and a transformer path on the same input, added.

    Bui et al. (2024) run ResNet-34 blocks (local texture) and Swin blocks (long-range context)
    in parallel and fuse them by addition (the "parallel" variant of their released code); the sum
    feeds the next stage. Downsampling stages stride the first BasicBlock on the CNN path and
    merge patches on the transformer path. A LayerNorm closes the transformer path before the sum,
    as Swin backbones for dense prediction normalise each stage's output, so both paths reach the
    addition on a comparable scale.
    attn_depth = 0 builds the CNN path only (a plain ResNet stage): the transformer path is then
    not constructed at all.

    drop_path: one stochastic-depth rate per Swin block (length attn_depth).
    input_resolution: the (H, W) of this stage's output in training, for the precomputed masks.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, cnn_depth: int, attn_depth: int,
                 num_heads: int, window_size: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 dropout: float = 0.0, attn_dropout: float = 0.0, drop_path: Sequence[float] = (),
                 input_resolution: tuple[int, int] | None = None):
        super().__init__()
        if not is_int(cnn_depth) or cnn_depth < 1:  # 2.0 failed in range()
            raise ValueError(f"cnn_depth must be an integer >= 1 (the CNN path carries the stage), got {cnn_depth!r}")
        attn_depth = check_int("attn_depth", attn_depth, 0)
        if len(drop_path) not in (0, attn_depth):
            raise ValueError(f"drop_path needs one rate per transformer block ({attn_depth}), got {len(drop_path)}")
        drop_path = list(drop_path) or [0.0] * attn_depth
        self.cnn = nn.Sequential(
            BasicBlock(in_channels, out_channels, stride),
            *(BasicBlock(out_channels, out_channels) for _ in range(cnn_depth - 1)),
        )
        self.merge: nn.Module | None = None
        self.transformer: nn.ModuleList | None = None
        self.norm: nn.Module | None = None
        if attn_depth > 0:
            if stride == 1 and in_channels == out_channels:
                self.merge = nn.Identity()
            elif stride == 2:
                self.merge = PatchMerging(in_channels, out_channels)
            else:
                raise ValueError(f"a stride-1 stage must keep its width ({in_channels} -> {out_channels} given)")
            self.transformer = nn.ModuleList(
                SwinBlock(out_channels, num_heads, window_size, shift=i % 2 == 1, mlp_ratio=mlp_ratio,
                          qkv_bias=qkv_bias, dropout=dropout, attn_dropout=attn_dropout, drop_path=drop_path[i],
                          input_resolution=input_resolution)
                for i in range(attn_depth)
            )
            self.norm = nn.LayerNorm(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C_in, H, W) -> (B, C_out, H / stride, W / stride)."""
        # local: ResNet blocks
        local = self.cnn(x)
        if self.transformer is None:  # CNN-only stage
            return local
        # global: merged patches as channels-last tokens through (shifted-)window attention
        tokens = self.merge(x).permute(0, 2, 3, 1)  # (B, H', W', C_out)
        for block in self.transformer:
            tokens = block(tokens)
        tokens = self.norm(tokens)
        # fuse: addition of the two paths
        return local + tokens.permute(0, 3, 1, 2)  # (B, C_out, H', W')


# ---------------------------------------------------------------------------------------------
# Dilated feature enhancement on the skip connections
# ---------------------------------------------------------------------------------------------


def check_dilations(dilations: Sequence[int]) -> tuple[int, ...]:
    """`dilations` as a tuple of Python ints >= 1 (NumPy ints too, as from a sweep; not True), or a ValueError."""
    return check_int_sequence("dilations", dilations, "one rate per DFE branch, e.g. (6, 12, 18) or (6,) for one")


class DFE(nn.Module):
    """Dilated feature enhancement, the three-branch form of Bui et al. (2024).

    A skip connection carries encoder features with a small receptive field into the decoder.
    DFE widens it before the decoder sees it: parallel 3x3 convolutions with dilations 6, 12, 18
    (each + BN, then a 1x1 convolution + BN) look 13, 25 and 37 pixels wide at the same cost as
    a plain 3x3; the branches are summed, passed through ReLU, and spatial attention keeps the
    regions that matter. Input and output channels are equal, so DFE drops into any skip.
    On a map no more than d pixels wide and high, every outer tap of a branch falls in the zero
    padding and it acts as a 1x1 convolution (at 64 px input the H/16 skip is 4 x 4: every branch
    does); on a larger map some taps reach inside it.
    """

    def __init__(self, channels: int, dilations: Sequence[int] = (6, 12, 18)):
        super().__init__()
        channels = check_int("channels", channels, 1)  # 0 built empty convolutions with only a UserWarning
        self.dilations = check_dilations(dilations)
        self.branches = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(channels, channels, 3, padding=d, dilation=d, bias=False), nn.BatchNorm2d(channels),
                nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels),
            )
            for d in self.dilations
        )
        self.attention = SpatialAttention()

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        # a running sum, not torch.stack(...).sum(0): stacking returns NCHW and drops channels_last
        # (and not sum(), which would start with 0 + the first map: one more full-size add)
        context = functools.reduce(operator.add, (branch(x) for branch in self.branches))  # (B, C, H, W)
        return self.attention(F.relu(context))


class ASPPDFE(nn.Module):
    """Dilated feature enhancement, the four-branch ASPP-like variant in the authors' code.

    Like DeepLab's atrous spatial pyramid pooling (Chen et al., 2017): a 1x1 branch plus one
    3x3 branch per dilation (6, 12, 18), each conv-BN-ReLU, concatenated and projected back to
    `channels` by a 3x3 conv-BN. (The kernel of the projection is not published; with 3x3 the
    `paper` preset has 56.3 M parameters, the size reported for the authors' four-branch model;
    a 1x1 projection would give 45.2 M.) With `residual` a 1x1 conv-BN shortcut of the input is added
    before the final ReLU, so the block can start close to the identity. We end it with the same
    spatial attention as DFE so both forms differ only in how they mix the dilated branches.
    """

    def __init__(self, channels: int, dilations: Sequence[int] = (6, 12, 18), residual: bool = True):
        super().__init__()
        channels = check_int("channels", channels, 1)  # 0 built empty convolutions with only a UserWarning
        self.dilations = check_dilations(dilations)

        def conv_bn_relu(kernel_size: int, dilation: int) -> nn.Sequential:
            padding = dilation * (kernel_size // 2)
            return nn.Sequential(
                nn.Conv2d(channels, channels, kernel_size, padding=padding, dilation=dilation, bias=False),
                nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
            )

        self.branches = nn.ModuleList([conv_bn_relu(1, 1), *(conv_bn_relu(3, d) for d in self.dilations)])
        self.project = nn.Sequential(
            nn.Conv2d(channels * len(self.branches), channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        )
        self.shortcut: nn.Module | None = None
        if residual:
            self.shortcut = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels))
        self.attention = SpatialAttention()

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        out = self.project(torch.cat([branch(x) for branch in self.branches], dim=1))  # (B, C, H, W)
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return self.attention(F.relu(out))
