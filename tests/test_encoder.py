"""Tests for mtlearn.encoder: the ResFormer encoder and its config."""

import pytest
import torch

from mtlearn.blocks import DropPath, PatchEmbed, SwinBlock
from mtlearn.encoder import ResFormerConfig, ResFormerEncoder

TINY = dict(widths=(8, 16, 32, 64), cnn_depths=(1, 1, 1, 1), attn_depths=(2, 1, 1, 1), num_heads=(1, 2, 2, 4))


def tiny_config(**overrides) -> ResFormerConfig:
    return ResFormerConfig(**{"in_channels": 1, "image_size": 32, **TINY, **overrides})


SHAPES = [
    # (in_channels, image_size the model is built for, input (H, W), use_attention)
    (1, 32, (32, 32), True),
    (3, 32, (32, 32), True),
    (1, 32, (32, 48), True),  # non-square, another size than built for
    (3, 64, (64, 32), True),
    (1, 32, (48, 32), False),
    (2, 32, (32, 32), False),
]


@pytest.mark.parametrize("in_channels, image_size, size, use_attention", SHAPES)
def test_encoder_returns_four_stages(in_channels, image_size, size, use_attention):
    encoder = ResFormerEncoder(tiny_config(in_channels=in_channels, image_size=image_size, use_attention=use_attention))
    H, W = size
    features = encoder(torch.randn(2, in_channels, H, W))
    assert [tuple(f.shape) for f in features] == [
        (2, 8, H // 2, W // 2), (2, 16, H // 4, W // 4), (2, 32, H // 8, W // 8), (2, 64, H // 16, W // 16)
    ]
    assert encoder.out_channels == [8, 16, 32, 64] and encoder.strides == [2, 4, 8, 16]
    assert all(torch.isfinite(f).all() for f in features)


BAD_CONFIGS = [
    ("heads do not divide widths", dict(num_heads=(3, 2, 2, 4)), "num_heads"),
    ("wrong number of heads", dict(num_heads=(1, 2, 2)), "one entry per stage"),
    ("wrong number of depths", dict(cnn_depths=(1, 1, 1, 1, 1)), "one entry per stage"),
    ("odd width", dict(widths=(8, 16, 33, 64), num_heads=(1, 1, 1, 1)), "even"),
    ("first width not a multiple of 8", dict(widths=(4, 8, 16, 32), num_heads=(1, 1, 1, 1)), "multiple of 8"),
    ("image size not divisible", dict(image_size=40), "stride 16"),
    ("image size too small", dict(image_size=8), "stride 16"),
    ("no input channels", dict(in_channels=0), "in_channels"),
    ("zero cnn depth", dict(cnn_depths=(0, 1, 1, 1)), "cnn_depths"),
    ("negative attention depth", dict(attn_depths=(1, -1, 1, 1)), "attn_depths"),
    ("drop path 1", dict(drop_path=1.0), r"drop_path must be a number in \[0, 1\) \(a probability; 0: none\)"),
    ("dropout as a string", dict(dropout="0.1"), r"dropout must be a number in \[0, 1\) .*got '0\.1'; pass it"),
    ("attention dropout NaN", dict(attn_dropout=float("nan")), r"attn_dropout must be a number in \[0, 1\)"),
    ("mlp ratio inf", dict(mlp_ratio=float("inf")), r"mlp_ratio must be a finite number > 0"),
    ("window 0", dict(window_size=0), "window_size"),
    ("mlp ratio 0", dict(mlp_ratio=0), "mlp_ratio"),
    ("switch as a string", dict(use_attention="False"), "use_attention must be True or False, got 'False'"),
    ("bias switch as a number", dict(qkv_bias=2), "qkv_bias must be True or False"),
]


@pytest.mark.parametrize("name, overrides, message", BAD_CONFIGS, ids=[b[0] for b in BAD_CONFIGS])
def test_bad_config(name, overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


BAD_INPUTS = [
    ("size not divisible by 16", (1, 1, 44, 32), r"44x32.*stride 16.*the nearest: 48x32\)"),
    ("width not divisible by 16", (1, 1, 32, 100), r"32x100.*stride 16.*the nearest: 32x96\)"),
    ("smaller than the stride", (1, 1, 8, 32), r"8x32.*stride 16.*the nearest: 16x32\)"),
    ("empty image", (1, 1, 0, 64), r"the images are empty \(size 0x64"),
    ("wrong channel count", (1, 3, 32, 32), r"got 3 \(shape \(1, 3, 32, 32\)\); build it with in_channels=3"),
    ("one image, not a batch", (1, 32, 32), r"shape \(1, 32, 32\); one image \(C, H, W\) becomes a batch of one "
     r"with image\[None\]"),
    ("a 5-D tensor", (1, 1, 1, 32, 32), r"B, C, H, W\), got a tensor of shape \(1, 1, 1, 32, 32\)$"),
    ("channels last", (2, 32, 32, 1), r"channels last \(shape \(2, 32, 32, 1\)\).*x\.permute\(0, 3, 1, 2\)"),
]


@pytest.mark.parametrize("name, shape, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input(name, shape, message):
    encoder = ResFormerEncoder(tiny_config())
    with pytest.raises(ValueError, match=message):
        encoder(torch.randn(shape))


def test_as_many_channels_as_the_width_is_not_taken_for_channels_last():
    encoder = ResFormerEncoder(tiny_config(in_channels=16))
    assert encoder(torch.randn(2, 16, 32, 16))[-1].shape[0] == 2  # W == C: still (B, C, H, W)


def test_one_image_of_one_stride_in_training_mode_is_named():
    encoder = ResFormerEncoder(tiny_config())
    with pytest.raises(ValueError, match=r"one 16x16 image in training mode.*batches of 2 or more.*model\.eval\(\)"):
        encoder(torch.randn(1, 1, 16, 16))
    assert [f.shape[-1] for f in encoder(torch.randn(2, 1, 16, 16))] == [8, 4, 2, 1]  # two images: BN has 2 values
    assert encoder(torch.randn(1, 1, 16, 32))[-1].shape[-2:] == (1, 2)  # one image with a 1x2 last map trains
    assert encoder.eval()(torch.randn(1, 1, 16, 16))[-1].shape[-2:] == (1, 1)  # eval: running statistics


def test_numpy_integers_from_a_sweep_are_accepted():
    import numpy as np

    assert tiny_config(in_channels=np.int64(3)).in_channels == 3


def test_window_defaults_to_a_sixteenth_of_the_image():
    assert tiny_config(image_size=128).window_size == 8
    assert tiny_config(image_size=(224, 160)).window_size == 10
    assert tiny_config(image_size=128, window_size=4).window_size == 4


def test_without_attention_is_a_plain_resnet():
    plain = ResFormerEncoder(tiny_config(use_attention=False))
    assert plain.patch_embed is None
    assert not any(isinstance(m, (SwinBlock, PatchEmbed)) for m in plain.modules())
    blocks = [len(stage.cnn) for stage in plain.stages]
    assert blocks == list(TINY["cnn_depths"])
    full = ResFormerEncoder(tiny_config())
    assert sum(isinstance(m, SwinBlock) for m in full.modules()) == sum(TINY["attn_depths"])
    # the same CNN path, parameter for parameter; the full encoder adds the transformer path only
    cnn, both = dict(plain.named_parameters()), dict(full.named_parameters())
    assert all(both[name].shape == p.shape for name, p in cnn.items())
    added = {name.split(".")[0] if name.startswith("patch_embed") else ".".join(name.split(".")[:3])
             for name in set(both) - set(cnn)}
    assert added == {"patch_embed", *(f"stages.{i}.{part}" for i in range(4) for part in ("transformer", "norm")),
                     *(f"stages.{i}.merge" for i in (1, 2, 3))}


def test_every_attention_setting_of_the_config_reaches_each_stages_blocks():
    """num_heads per stage, qkv_bias, attn_dropout, dropout and mlp_ratio: a setting the encoder dropped on the way
    would build the defaults without a word."""
    config = tiny_config(qkv_bias=False, attn_dropout=0.1, dropout=0.2, mlp_ratio=2.0)
    encoder = ResFormerEncoder(config)
    for i, stage in enumerate(encoder.stages):
        for block in stage.transformer:
            assert block.attn.num_heads == config.num_heads[i], i
            assert block.attn.qkv.bias is None and block.attn.attn_dropout == 0.1
            assert block.attn.proj_drop.p == 0.2
            assert block.mlp[0].out_features == 2 * config.widths[i]
    default = [b for b in ResFormerEncoder(tiny_config()).modules() if isinstance(b, SwinBlock)]
    assert all(b.attn.qkv.bias is not None for b in default)


def test_the_stem_is_resnets_7x7_convolution_then_a_stride_2_max_pool():
    """A 3x3 stem changes the parameter count by a few hundred weights only: the presets' counts miss it."""
    conv, _, _, pool = ResFormerEncoder(tiny_config()).stem
    assert (conv.kernel_size, conv.stride, conv.padding) == ((7, 7), (1, 1), (3, 3))
    assert (pool.kernel_size, pool.stride, pool.padding) == (3, 2, 1)


def test_shifted_windows_in_every_second_block_and_drop_path_rising_linearly():
    encoder = ResFormerEncoder(tiny_config(attn_depths=(2, 2, 2, 2), drop_path=0.1))
    blocks = [m for m in encoder.modules() if isinstance(m, SwinBlock)]
    assert [b.shift for b in blocks] == [False, True] * 4
    rates = [b.drop_path.drop_prob if isinstance(b.drop_path, DropPath) else 0.0 for b in blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.1, 8).tolist())


def test_stage_output_is_cnn_plus_transformer_and_feeds_the_next_stage():
    encoder = ResFormerEncoder(tiny_config()).eval()
    x = torch.randn(1, 1, 32, 32)
    features = encoder(x)
    stem = encoder.stem(x) + encoder.patch_embed(x)
    assert torch.allclose(features[0], encoder.stages[0](stem), atol=1e-6)
    assert torch.allclose(features[1], encoder.stages[1](features[0]), atol=1e-6)


def test_weights_are_initialised_as_resnet_and_swin():
    # He (fan_out, ReLU) for convolutions: std sqrt(2 / (out_channels * k * k)); linear layers N(0, 0.02);
    # biases zero. The layers are large (~20k weights) so the sample std is within a few percent.
    torch.manual_seed(0)
    encoder = ResFormerEncoder(tiny_config())
    conv = encoder.stages[3].cnn[0].conv1  # 32 -> 64 channels, 3x3: fan_out 576, fan_in 288
    assert conv.weight.std().item() == pytest.approx((2 / (64 * 9)) ** 0.5, rel=0.05)
    qkv = encoder.stages[3].transformer[0].attn.qkv  # 64 -> 192
    assert qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.all(qkv.bias == 0) and torch.all(encoder.stages[3].norm.weight == 1)


def test_each_swin_block_precomputes_the_mask_of_the_map_it_sees_in_training():
    # input_resolution: the block's mask buffer is for its own map size at the training image size
    encoder = ResFormerEncoder(tiny_config(image_size=64, window_size=3)).eval()
    seen = {}
    for block in (m for m in encoder.modules() if isinstance(m, SwinBlock)):
        block.register_forward_hook(lambda module, inputs, output: seen.update({module: tuple(inputs[0].shape[1:3])}))
    encoder(torch.randn(1, 1, 64, 64))
    assert len(seen) == sum(TINY["attn_depths"])
    assert all(block.mask_resolution == size for block, size in seen.items())
    assert any(block.attn_mask is not None for block in seen)  # window 3 pads every map: masks were needed


def test_gradient_reaches_every_parameter_and_eval_is_deterministic():
    encoder = ResFormerEncoder(tiny_config(attn_depths=(2, 2, 2, 2)))
    features = encoder(torch.randn(2, 1, 32, 32))
    sum(f.square().mean() for f in features).backward()
    missing = [n for n, p in encoder.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    # the attention path learns too (not only the CNN path): its gradients are not all zero
    attention = [p for n, p in encoder.named_parameters() if ".transformer." in n and n.endswith("qkv.weight")]
    assert attention and all(p.grad.abs().sum() > 0 for p in attention)
    encoder.eval()
    x = torch.randn(2, 1, 32, 48)
    assert all(torch.equal(a, b) for a, b in zip(encoder(x), encoder(x)))


@pytest.mark.parametrize("dtype, match", [
    (torch.uint8, r"torch\.uint8; convert with \.float\(\) / 255"),
    (torch.int64, r"torch\.int64; convert with \.float\(\)"),
    (torch.float64, r"float64 but the model's weights are torch\.float32; convert with \.float\(\)"),
    # half precision without autocast: "expected scalar type Half but found Float" from inside torch
    (torch.float16, r"float16 but the model's weights are torch\.float32; convert with \.float\(\), or run .*autocast"),
    (torch.bfloat16, r"bfloat16 but the model's weights are torch\.float32; convert with \.float\(\)"),
])
def test_integer_and_other_float_images_are_refused_with_the_fix(dtype, match):
    encoder = ResFormerEncoder(tiny_config())
    with pytest.raises(ValueError, match=match):  # was conv's "expected scalar type Byte but found Float"
        encoder(torch.zeros(1, 1, 32, 32, dtype=dtype))


def test_float64_images_work_with_a_float64_encoder():
    encoder = ResFormerEncoder(tiny_config()).double().eval()
    assert encoder(torch.rand(1, 1, 32, 32, dtype=torch.float64))[0].dtype == torch.float64


def test_half_precision_images_run_under_autocast():
    """Under autocast the layers cast their inputs themselves: a bf16 batch is not refused there."""
    encoder = ResFormerEncoder(tiny_config()).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert encoder(torch.rand(1, 1, 32, 32, dtype=torch.bfloat16))[0].dtype == torch.bfloat16
    # autocast casts float32 only: a float64 batch failed in the first convolution ("expected scalar type
    # Double but found BFloat16"); a float64 encoder still takes it there
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        with pytest.raises(ValueError, match=r"images are torch\.float64 but the model's weights are torch\.float32; "
                                             r"convert with \.float\(\)"):
            encoder(torch.rand(1, 1, 32, 32, dtype=torch.float64))
        double = ResFormerEncoder(tiny_config()).double().eval()
        assert double(torch.rand(1, 1, 32, 32, dtype=torch.float64))[0].dtype == torch.float64


@pytest.mark.parametrize("image_size", [128.0, (128, 128.0)])
def test_float_image_size_names_int(image_size):
    with pytest.raises(ValueError, match=r"image_size must be an int.*got .*128\.0.*int\(\.\.\.\)"):
        tiny_config(image_size=image_size)  # was "'float' object is not iterable" (or passed as floats)


@pytest.mark.parametrize("overrides, message", [
    (dict(image_size=64, window_size=64 / 16),
     r"window_size must be an int .*got 4\.0; pass an int, e.g. image_size // 16"),
    (dict(window_size=2.5), r"window_size must be an int .*got 2\.5"),
    (dict(widths=(8.0, 16, 32, 64)), r"widths must be ints, got \(8\.0, 16, 32, 64\); pass ints"),
    (dict(cnn_depths=(1, 1, 1, 1.5)), r"cnn_depths must be ints"),
    (dict(attn_depths=(2, 1, 1, 1.0)), r"attn_depths must be ints"),
    (dict(num_heads=(1.0, 2, 2, 4)), r"num_heads must be ints"),
])
def test_float_sizes_and_counts_name_int(overrides, message):
    # each passed the config check, then failed inside torch (reshape, range, empty) naming no config field
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_numpy_integer_counts_become_ints():
    import numpy as np

    config = tiny_config(window_size=np.int64(2), num_heads=tuple(np.array([1, 2, 2, 4])))
    assert type(config.window_size) is int and all(type(h) is int for h in config.num_heads)


def test_mlp_ratio_must_leave_a_hidden_unit():
    # 8 channels x 0.1 = 0 hidden units: built with only a torch warning, an MLP that learns nothing
    with pytest.raises(ValueError, match=r"mlp_ratio 0\.1 x 8 channels gives the MLP 0 hidden units; use an "
                                         r"mlp_ratio of at least 1 / 8"):
        tiny_config(mlp_ratio=0.1)
    assert tiny_config(mlp_ratio=1 / 8).mlp_ratio == 1 / 8
    assert tiny_config(mlp_ratio=0.1, use_attention=False).mlp_ratio == 0.1  # no MLP is built
    with pytest.raises(ValueError, match=r"mlp_ratio must be a finite number > 0 \(the MLP.*got '4'; pass it unquoted"):
        tiny_config(mlp_ratio="4")
