"""Tests for mtlearn.mtl: the multi-task UNet, presets, single-task and MONAI baselines."""

import warnings

import numpy as np
import pytest
import torch

from mtlearn.blocks import DFE, DropPath, WindowAttention
from mtlearn.mtl import (PRESETS, TASKS, MultiTaskConfig, MultiTaskUNet, build_model, monai_baseline,
                         single_task_model)
from mtlearn.utils import count_parameters

TINY = dict(widths=(8, 16, 32, 64), cnn_depths=(1, 1, 1, 1), attn_depths=(2, 1, 1, 1), num_heads=(1, 2, 2, 4),
            dilations=(2, 4))


def tiny_model(**overrides) -> MultiTaskUNet:
    return MultiTaskUNet(MultiTaskConfig(**{"in_channels": 1, "image_size": 32, **TINY, **overrides}))


def expected_shapes(tasks, batch, in_channels, height, width, num_classes=3, seg_classes=2):
    shapes = {"seg": (batch, seg_classes, height, width), "cls": (batch, num_classes),
              "recon": (batch, in_channels, height, width)}
    return {t: shapes[t] for t in tasks}


VARIANTS = [
    # (name, config overrides, input (C, H, W))
    ("seg+cls", dict(), (1, 32, 32)),
    ("all tasks rgb", dict(tasks=("seg", "cls", "recon"), in_channels=3), (3, 32, 32)),
    ("seg only", dict(tasks=("seg",)), (1, 32, 48)),
    ("cls only", dict(tasks=("cls",)), (1, 48, 32)),
    ("recon only", dict(tasks=("recon",)), (1, 32, 32)),
    ("cls+recon", dict(tasks=("cls", "recon")), (1, 32, 32)),
    ("dfe three", dict(dfe="three"), (1, 32, 32)),
    ("dfe four", dict(dfe="four", tasks=("seg", "cls", "recon")), (1, 32, 64)),
    ("no attention", dict(use_attention=False, tasks=("seg", "cls", "recon")), (1, 32, 32)),
    ("last-stage classifier", dict(cls_head="last"), (1, 32, 32)),
    ("more classes", dict(num_classes=5, seg_classes=3), (1, 32, 32)),
]


@pytest.mark.parametrize("name, overrides, size", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_output_shapes(name, overrides, size):
    model = tiny_model(**overrides)
    C, H, W = size
    out = model(torch.randn(2, C, H, W))
    config = model.config
    assert list(out) == list(config.tasks)  # keys in the order the tasks were given
    assert {t: tuple(v.shape) for t, v in out.items()} == expected_shapes(
        config.tasks, 2, C, H, W, config.num_classes, config.seg_classes)


FULL_VARIANTS = [v for v in VARIANTS if v[0] in ("all tasks rgb", "dfe three", "dfe four", "no attention",
                                                 "last-stage classifier")]


@pytest.mark.parametrize("name, overrides, size", FULL_VARIANTS, ids=[v[0] for v in FULL_VARIANTS])
def test_gradient_reaches_every_parameter_without_nan(name, overrides, size):
    model = tiny_model(**overrides)
    out = model(torch.randn(2, *size))
    assert all(torch.isfinite(v).all() for v in out.values())
    sum(v.float().square().mean() for v in out.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient reached {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_eval_mode_is_deterministic():
    model = tiny_model(tasks=("seg", "cls", "recon"), dfe="three", dropout=0.3, attn_dropout=0.3, drop_path=0.3).eval()
    x = torch.randn(2, 1, 32, 32)
    first, second = model(x), model(x)
    assert all(torch.equal(first[t], second[t]) for t in first)


BAD_ARGUMENTS = [
    ("unknown task", lambda: tiny_model(tasks=("seg", "depth")), "unknown task 'depth'"),
    ("no task", lambda: tiny_model(tasks=()), "tasks"),
    ("repeated task", lambda: tiny_model(tasks=("seg", "seg")), "tasks must not repeat"),
    ("unknown dfe", lambda: tiny_model(dfe="five"), "DFE mode"),
    ("unknown dfe, no decoder", lambda: tiny_model(tasks=("cls",), dfe="five"), "unknown DFE mode 'five'"),
    ("unknown cls head", lambda: tiny_model(cls_head="first"), "cls_head"),
    ("one class", lambda: tiny_model(num_classes=1),
     r"num_classes must be >= 2, got 1: .*a yes/no task has 2 classes \(e\.g\. benign and malignant\)"),
    ("one mask class", lambda: tiny_model(seg_classes=1), r"seg_classes must be >= 2, got 1: .*background and lesion"),
    ("bad dilations", lambda: tiny_model(dilations=(6, 0)), "dilations"),
    ("a switch as a dilation", lambda: tiny_model(dfe="three", dilations=(True, 2)),
     r"each of dilations must be an integer >= 1, got True"),
    ("no classifier width", lambda: tiny_model(cls_hidden=0), "cls_hidden must be an integer >= 1"),
    ("float classifier width", lambda: tiny_model(cls_hidden=32.0), r"cls_hidden must be an integer >= 1.*int\("),
    ("heads do not divide widths", lambda: tiny_model(num_heads=(3, 2, 2, 4)), "num_heads"),
    ("unknown preset", lambda: build_model("huge"), "paper.*course.*tiny"),
    ("preset in a list", lambda: build_model(["tiny"]), r"unknown preset \['tiny'\]"),  # unhashable type: 'list'
    # build_model(run.profile) in the smoke profile: a profile is not a model size
    ("a profile", lambda: build_model("smoke"), r"'smoke' is a notebook profile, not a model size \(its notebooks "
     r"use 'tiny'\)"),
    ("unknown option", lambda: build_model("tiny", image_size=32, depth=3), "unknown model option"),
    ("size not divisible", lambda: build_model("tiny", image_size=100), r"stride 16.*the nearest: \(96, 96\)"),
    ("a side too small", lambda: build_model("tiny", image_size=(50, 8)), r"the nearest: \(48, 16\)"),
    ("single task unknown", lambda: single_task_model("depth", "tiny"), "unknown task"),
    ("unknown monai model", lambda: monai_baseline("vnet"), "unet.*swinunetr"),
    ("monai size", lambda: monai_baseline("swinunetr", image_size=48, feature_size=12), "stride 32"),
    ("monai no channels", lambda: monai_baseline("unet", in_channels=0), "in_channels must be an integer >= 1"),
    ("monai one class", lambda: monai_baseline("unet", seg_classes=1), "seg_classes must be an integer >= 2"),
    ("monai strides", lambda: monai_baseline("unet", channels=(16, 32)),
     r"one stride per downsampling.*strides=\(2, 2, 2, 2\)"),
    ("monai fractional stride", lambda: monai_baseline("unet", strides=(2, 2, 1.5, 2)),
     r"whole-number strides >= 1.*strides=\(2, 2, 1\.5, 2\)"),
    ("monai stride 0", lambda: monai_baseline("unet", channels=(4, 8, 16), strides=(0, 2)),  # not ZeroDivisionError
     r"whole-number strides >= 1.*strides=\(0, 2\)"),
    # each built, then failed in its first forward with torch's "Expected more than 1 spatial element when training"
    ("monai unet 1x1 bottom", lambda: monai_baseline("unet", image_size=16),
     r"image_size 16x16 would leave MONAI's unet a 1x1 map at its bottom \(stride 16\).*at least 32 on a side"),
    ("monai swinunetr 1x1 bottom", lambda: monai_baseline("swinunetr", image_size=32, feature_size=12),
     r"image_size 32x32 would leave MONAI's swinunetr a 1x1 map.*at least 64 on a side"),
]


@pytest.mark.parametrize("name, factory, message", BAD_ARGUMENTS, ids=[b[0] for b in BAD_ARGUMENTS])
def test_bad_arguments(name, factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


@pytest.mark.parametrize("shape, message", [((1, 1, 40, 32), r"40x32.*stride 16"), ((1, 3, 32, 32), "in_channels=3")])
def test_bad_input(shape, message):
    with pytest.raises(ValueError, match=message):
        tiny_model()(torch.randn(shape))


@pytest.mark.parametrize("given, fix", [
    ({"image": torch.zeros(1, 1, 32, 32)}, r"got a dict; pass its image: model\(batch\['image'\]\)"),
    (np.zeros((1, 1, 32, 32), dtype=np.float32), r"got a ndarray; convert it: torch.as_tensor"),
])
def test_input_that_is_not_a_tensor_names_the_fix(given, fix):
    with pytest.raises(TypeError, match=r"the model takes a batch of images, a tensor \(B, C, H, W\); " + fix):
        tiny_model()(given)


def test_dense_tasks_get_their_own_decoder_and_share_the_encoder():
    model = tiny_model(tasks=("seg", "cls", "recon"), dfe="three")
    assert set(model.decoders) == {"seg", "recon"} and set(model.heads) == set(TASKS)
    assert model.decoders["seg"] is not model.decoders["recon"]
    assert {id(p) for p in model.shared_parameters()} == {id(p) for p in model.encoder.parameters()}
    # the features every task reads are computed once per forward, by the encoder: count its calls
    # and check that both decoders and the classifier receive that very output
    encoded, received = [], {}
    model.encoder.register_forward_hook(lambda module, inputs, output: encoded.append(output))
    readers = {"seg": model.decoders["seg"], "recon": model.decoders["recon"], "cls": model.heads["cls"]}
    for task, module in readers.items():
        module.register_forward_hook(lambda module, inputs, output, task=task: received.update({task: inputs[0]}))
    model(torch.randn(1, 1, 32, 32))
    assert len(encoded) == 1
    assert set(received) == {"seg", "recon", "cls"} and all(f is encoded[0] for f in received.values())


def test_only_the_segmentation_decoder_refines_its_skips():
    # DFE adds lesion context for segmentation; the denoising decoder keeps plain skips
    model = tiny_model(tasks=("seg", "cls", "recon"), dfe="three")
    assert all(isinstance(r, DFE) for r in model.decoders["seg"].refine)
    assert all(isinstance(r, torch.nn.Identity) for r in model.decoders["recon"].refine)


@pytest.mark.parametrize("cls_head, read", [("multiscale", (32, 64)), ("last", (64,))])
def test_classifier_reads_the_last_two_stages_or_the_last_one(cls_head, read):
    head = tiny_model(cls_head=cls_head).heads["cls"]
    assert [norm.num_features for norm in head.norms] == list(read) and head.fc1.in_features == sum(read)


def test_decoders_and_heads_get_the_encoder_initialisation():
    # He (fan_out) convolutions and N(0, 0.02) linear layers everywhere, not torch's defaults
    torch.manual_seed(0)
    model = tiny_model(widths=(32, 64, 128, 256), num_heads=(1, 2, 4, 8), tasks=("seg", "cls"))
    fuse = model.decoders["seg"].fuse[2][0]  # 3x3 conv 256 -> 128 channels: fan_out 1152
    assert fuse.weight.std().item() == pytest.approx((2 / (128 * 9)) ** 0.5, rel=0.05)
    fc1 = model.heads["cls"].fc1  # 384 -> 32
    assert fc1.weight.std().item() == pytest.approx(0.02, rel=0.05) and torch.all(fc1.bias == 0)
    assert torch.all(model.heads["seg"].conv.bias == 0)


def test_single_task_model_has_the_same_encoder_and_one_head():
    multi = build_model("tiny", tasks=("seg", "cls"), image_size=32)
    for task in TASKS:
        single = single_task_model(task, "tiny", image_size=32)
        assert single.tasks == (task,) and list(single.heads) == [task]
        assert count_parameters(single.encoder) == count_parameters(multi.encoder)
        assert list(single(torch.randn(1, 1, 32, 32))) == [task]


def test_build_model_applies_overrides():
    model = build_model("tiny", tasks="seg", in_channels=3, image_size=64, dfe="four", window_size=2)
    assert model.config.in_channels == 3 and model.config.dfe == "four" and model.config.window_size == 2
    assert model.config.widths == PRESETS["tiny"]["widths"]
    # an override of a value the preset sets wins over the preset
    model = build_model("tiny", tasks="seg", image_size=32, widths=(8, 16, 32, 64), num_heads=(1, 1, 2, 2),
                        drop_path=0.2)
    assert model.config.widths == (8, 16, 32, 64) and model.config.num_heads == (1, 1, 2, 2)
    assert model.config.drop_path == 0.2 and model.encoder.out_channels == [8, 16, 32, 64]


# Parameter counts documented in the comments of mtl.PRESETS (tasks seg+cls, 1 channel, 3 classes), as written
# there: each must hold to its last digit (within 1 %, a missing 1x1 shortcut in every ASPP-like DFE, 0.6 % of
# the paper model, passed).
DOCUMENTED_PARAMETERS = [
    # (preset, image_size, overrides, documented count in millions)
    ("paper", 224, dict(), "33.65"),
    ("paper", 224, dict(dfe="three"), "44.11"),
    ("paper", 224, dict(dfe="four"), "56.29"),  # SPEC: about 56 M with the four-branch DFE
    ("paper", 224, dict(use_attention=False), "23.54"),
    ("paper", 224, dict(tasks=("seg", "cls", "recon")), "35.90"),
    ("course", 128, dict(), "4.33"),
    ("course", 128, dict(dfe="three"), "6.95"),
    ("course", 128, dict(dfe="four"), "10.00"),
    ("course", 128, dict(use_attention=False), "1.80"),
    ("tiny", 64, dict(), "0.83"),
    ("tiny", 64, dict(dfe="three"), "1.48"),
    ("tiny", 64, dict(dfe="four"), "2.25"),
    ("tiny", 64, dict(use_attention=False), "0.455"),
]


@pytest.mark.parametrize("preset, image_size, overrides, documented", DOCUMENTED_PARAMETERS)
def test_preset_parameter_counts_match_the_documentation(preset, image_size, overrides, documented):
    count = count_parameters(build_model(preset, image_size=image_size, **overrides))
    digits = len(documented.partition(".")[2])  # "33.65": rounded to 10,000 parameters
    assert f"{count / 1e6:.{digits}f}" == documented


def test_stochastic_depth_rises_to_the_presets_rate():
    """SPEC: 0 -> 0.1 over the paper's Swin blocks; the course preset half of it, the tiny one none."""
    for preset, last in (("paper", 0.1), ("course", 0.05), ("tiny", 0.0)):
        rates = [m.drop_prob for m in build_model(preset, image_size=64).modules() if isinstance(m, DropPath)]
        assert (rates[-1] if rates else 0.0) == pytest.approx(last), preset


@pytest.mark.parametrize("preset, head_dim", [("paper", 32), ("course", 32), ("tiny", 16)])
def test_every_attention_head_of_a_preset_has_the_documented_width(preset, head_dim):
    """SPEC: head dim 32 (heads 2/4/8/16 at widths 64..512). Heads change no parameter count, so the counts
    above cannot see a wrong head number."""
    attentions = [m for m in build_model(preset, image_size=64).modules() if isinstance(m, WindowAttention)]
    assert attentions and {m.qkv.in_features // m.num_heads for m in attentions} == {head_dim}
    assert all(m.qkv.in_features % m.num_heads == 0 for m in attentions)


def test_monai_unet_is_the_documented_network_and_its_stride_follows_its_strides():
    assert count_parameters(monai_baseline("unet", image_size=64)) == pytest.approx(1.6e6, rel=0.03)  # 2 res units
    shallow = monai_baseline("unet", image_size=36, channels=(4, 8, 16), strides=(2, 2))  # 36: divisible by 4
    assert shallow.stride == 4 and shallow(torch.randn(1, 1, 36, 36))["seg"].shape == (1, 2, 36, 36)
    # the product of the strides, not 2 per level: (3, 2) built at 36 failed with "Sizes of tensors must match",
    # and (2, 1) refused 34 as "not divisible by stride 4"
    for strides, side, stride in (((3, 2), 36, 6), ((2, 1), 34, 2)):
        model = monai_baseline("unet", image_size=side, channels=(4, 8, 16), strides=strides)
        assert model.stride == stride and model(torch.randn(1, 1, side, side))["seg"].shape == (1, 2, side, side)


def test_a_monai_baseline_refuses_images_that_leave_one_pixel_at_its_bottom_unless_its_norm_takes_them():
    model = monai_baseline("unet", image_size=32, channels=(4, 8, 16), strides=(2, 2))
    model(torch.randn(1, 1, 4, 8))  # a 1x2 map at the bottom: normalised
    for mode in (model.train, model.eval):  # torch's "when training" came in eval mode too
        mode()
        with pytest.raises(ValueError, match=r"image size 4x4 would leave MONAI's unet a 1x1 map.*at least 8 on"):
            model(torch.randn(2, 1, 4, 4))
    batch_norm = monai_baseline("unet", image_size=16, norm="batch")  # a batch of 2 gives batch norm 2 values
    assert batch_norm(torch.randn(2, 1, 16, 16))["seg"].shape == (2, 2, 16, 16)


def test_paper_preset_matches_the_published_size():
    # Bui et al.: about 33.7M parameters at 224 px for the parallel variant without DFE (RGB input)
    count = count_parameters(build_model("paper", in_channels=3, image_size=224))
    assert count == pytest.approx(33.7e6, rel=0.05)
    assert count_parameters(build_model("course", image_size=128, dfe="three")) <= 8e6  # the paper's DFE included
    assert count_parameters(build_model("tiny", image_size=64)) < 1e6


def test_channels_last_and_bfloat16():
    model = tiny_model(tasks=("seg", "cls", "recon"), dfe="four").eval()
    x = torch.randn(2, 1, 32, 32)
    reference = model(x)
    fast = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    assert all(torch.allclose(fast[t], reference[t], atol=1e-4) for t in reference)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x)
    assert all(torch.isfinite(v).all() for v in low.values())


@pytest.mark.parametrize("name, options", [("unet", dict(channels=(4, 8, 16), strides=(2, 2))),
                                           ("swinunetr", dict(feature_size=12))])
def test_monai_baselines(name, options):
    model = monai_baseline(name, in_channels=3, seg_classes=2, image_size=64, **options)
    out = model(torch.randn(1, 3, 64, 64))
    assert list(out) == ["seg"] and out["seg"].shape == (1, 2, 64, 64)
    assert model.tasks == ("seg",)
    encoder = {id(p) for p in model.encoder.parameters()}
    every = {id(p) for p in model.parameters()}
    assert encoder and encoder < every  # the contracting path: part of the network, not all of it
    with pytest.raises(ValueError, match="stride"):
        model(torch.randn(1, 3, 66, 66))


def test_monai_unet_encoder_is_the_contracting_path_down_to_the_bottom_layer():
    # MONAI nests UNet levels as Sequential(down, SkipConnection(next level), up); the innermost
    # SkipConnection holds the bottom (bottleneck) layer, the deepest part of the contracting path
    model = monai_baseline("unet", in_channels=1, image_size=32, channels=(4, 8, 16), strides=(2, 2))
    outer = model.net.model
    inner = outer[1].submodule
    down, bottom = [outer[0], inner[0]], inner[1].submodule
    assert [id(m) for m in model.encoder] == [id(m) for m in (*down, bottom)]
    shared = {id(p) for p in model.shared_parameters()}
    assert {id(p) for p in bottom.parameters()} <= shared
    assert not shared & {id(p) for p in (*outer[2].parameters(), *inner[2].parameters())}  # up path excluded


@pytest.mark.parametrize("factory, match", [
    (lambda: build_model("tiny", image_size=256 / 2), r"image_size must be an int.*128\.0.*int\(\.\.\.\)"),
    (lambda: monai_baseline("unet", image_size=64.0), r"image_size must be an int.*64\.0.*int\(\.\.\.\)"),
    (lambda: build_model("tiny", image_size=32, num_classes=3.5),
     r"num_classes must be an integer >= 2, got 3\.5.*int"),
    (lambda: build_model("tiny", image_size=32, seg_classes=2.0), r"seg_classes must be an integer >= 2, got 2\.0"),
])
def test_float_sizes_and_class_counts_name_int(factory, match):
    # were "'float' object is not iterable" and a TypeError from nn.Linear / torch.empty
    with pytest.raises(ValueError, match=match):
        factory()


def test_every_option_reaches_the_layer_it_configures():
    """Options that change no shape and few parameters: a dropped one would still build and train."""
    from torch import nn

    model = tiny_model(tasks=("seg", "cls"), dfe="three", dilations=(3,), qkv_bias=False, mlp_ratio=2.0,
                       dropout=0.25, attn_dropout=0.125, cls_hidden=12)
    for stage, heads, width in zip(model.encoder.stages, TINY["num_heads"], TINY["widths"]):
        for block in stage.transformer:
            assert block.attn.num_heads == heads  # per stage, as the paper's 2/4/8/16 (head size 32)
            assert block.attn.qkv.bias is None and block.attn.attn_dropout == 0.125
            assert block.attn.proj_drop.p == 0.25
            assert block.mlp[0].out_features == 2 * width
            assert [m.p for m in block.mlp if isinstance(m, nn.Dropout)] == [0.25, 0.25]
    assert [dfe.dilations for dfe in model.decoders["seg"].refine] == [(3,)] * 4
    assert model.heads["cls"].fc1.out_features == 12 and model.heads["cls"].drop.p == 0.25


def test_the_stem_and_blocks_are_resnet_ones():
    """A 7x7 convolution, BN, ReLU and a 3x3 max-pool; basic blocks of two undilated 3x3 convolutions; the
    decoder fuses with conv-BN-ReLU; each DFE branch is a dilated 3x3 conv + BN, then a 1x1 conv + BN."""
    from torch import nn

    model = tiny_model(dfe="three")
    stem = model.encoder.stem
    assert [type(m) for m in stem] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d]
    assert stem[0].kernel_size == (7, 7) and stem[3].kernel_size == 3
    for block in (b for stage in model.encoder.stages for b in stage.cnn):
        assert [(c.kernel_size, c.dilation) for c in (block.conv1, block.conv2)] == [((3, 3), (1, 1))] * 2
    for fuse in model.decoders["seg"].fuse:
        assert [type(m) for m in fuse] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    for branch in model.decoders["seg"].refine[0].branches:
        assert [type(m) for m in branch] == [nn.Conv2d, nn.BatchNorm2d, nn.Conv2d, nn.BatchNorm2d]
        assert branch[2].kernel_size == (1, 1)


def test_numpy_dilations_from_a_sweep_are_taken_as_ints():
    """isinstance(d, int) refused np.int64(6), which every other integer option accepts."""
    import numpy as np

    model = tiny_model(dfe="three", dilations=tuple(np.array([2, 3])))
    assert model.config.dilations == (2, 3) and all(type(d) is int for d in model.config.dilations)
    model = tiny_model(num_classes=np.int64(4))  # kept as given, a NumPy int reached the saved config
    assert type(model.config.num_classes) is int and model(torch.zeros(1, 1, 32, 32))["cls"].shape == (1, 4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(tasks=None), r"tasks must name some of \('seg', 'cls', 'recon'\), e.g. \('seg', 'cls'\), got None"),
    (dict(tasks=3), r"tasks must name some of .*got 3"),
    (dict(dfe="three", dilations=6), r"dilations must list one rate per DFE branch, e.g. \(6, 12, 18\) or \(6,\) "
                                     r"for one, got 6"),
])
def test_a_non_sequence_for_tasks_or_dilations_is_named(kwargs, match):
    """Each was a bare TypeError: "'NoneType' / 'int' object is not iterable"."""
    with pytest.raises(ValueError, match=match):
        build_model("tiny", image_size=32, **kwargs)


@pytest.mark.parametrize("dtype, match", [(torch.uint8, r"convert with \.float\(\) / 255"),
                                          (torch.float64, r"float64 but the model's weights are torch\.float32")])
def test_integer_and_float64_images_are_refused_by_both_model_kinds(dtype, match):
    images = torch.zeros(1, 1, 32, 32, dtype=dtype)
    for model in (tiny_model(), monai_baseline("unet", image_size=32)):
        with pytest.raises(ValueError, match=match):
            model(images)


# ------------------------------------------------------------------------------- a trained model, used later

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny model trained for an epoch by fit into a run folder (options no preset holds: dfe, cls_head)."""
    from torch.utils.data import DataLoader, Subset

    import mtlearn as mt

    folder = tmp_path_factory.mktemp("run")
    data = Subset(mt.data.load_dataset("synthetic", split="train", image_size=32), range(16))
    model = build_model("tiny", image_size=32, dfe="three", cls_head="last")
    mt.fit(model, DataLoader(data, batch_size=8), DataLoader(data, batch_size=8), epochs=1, out_dir=folder,
           progress=False)
    return folder, model.eval()


def test_load_model_builds_the_trained_network_again_from_its_checkpoint(trained_run):
    from mtlearn.checkpoint import load_checkpoint
    from mtlearn.mtl import load_model

    folder, trained = trained_run
    loaded = load_model(folder / "best.pt")
    assert loaded.config == trained.config and not loaded.training
    x = torch.rand(2, 1, 32, 32)
    assert all(torch.equal(v, trained(x)[k]) for k, v in loaded(x).items())
    assert load_checkpoint(folder / "best.pt")["class_names"] == ["normal", "benign", "malignant"]


def test_load_model_names_the_settings_of_a_later_version(trained_run, tmp_path):
    from mtlearn.checkpoint import load_checkpoint, save_checkpoint
    from mtlearn.mtl import load_model

    folder, _ = trained_run
    state = load_checkpoint(folder / "best.pt")
    state["model_config"] = {**state["model_config"], "gated_skips": True}
    save_checkpoint(state, tmp_path / "newer.pt")
    with pytest.raises(ValueError, match=r"newer\.pt records model settings this version of mtlearn does not know "
                                         r"\(\['gated_skips'\]\): update mtlearn"):  # not a bare TypeError
        load_model(tmp_path / "newer.pt")


def test_a_resume_with_the_classes_in_another_order_is_refused(trained_run, tmp_path):
    """The recorded class names were overwritten by the new data's, and the classifier trained on the old order."""
    import shutil

    from torch.utils.data import DataLoader, Subset

    import mtlearn as mt

    folder, _ = trained_run
    shutil.copy(folder / "last.pt", tmp_path / "last.pt")
    data = mt.data.load_dataset("synthetic", split="train", image_size=32)
    data.class_names = ("malignant", "benign", "normal")
    loader = DataLoader(Subset(data, range(16)), batch_size=8)
    with pytest.raises(ValueError, match=r"it trained on the classes \['normal', 'benign', 'malignant'\], the "
                                         r"training data now has \['malignant', 'benign', 'normal'\]"):
        mt.fit(build_model("tiny", image_size=32, dfe="three", cls_head="last"), loader, epochs=2,
               out_dir=tmp_path, resume=True, progress=False)


def test_load_model_refuses_a_checkpoint_without_model_settings_and_says_what_to_do(tmp_path):
    from mtlearn.checkpoint import save_checkpoint
    from mtlearn.mtl import load_model

    save_checkpoint({"model": build_model("tiny", image_size=32).state_dict()}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match=r"old\.pt records no model settings .* build the model as it was trained, "
                                         r"e\.g\. build_model\(preset, image_size=\.\.\., num_classes=\.\.\.\), and "
                                         r"load it with load_checkpoint\(path, model\)"):
        load_model(tmp_path / "old.pt")


def test_the_readmes_trained_model_example_predicts_on_an_image_file(trained_run, tmp_path, monkeypatch):
    """README, "Using a trained model": the example runs as printed on a PNG of another size."""
    from pathlib import Path

    from PIL import Image

    import mtlearn as mt

    folder, trained = trained_run
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("**Using a trained model.**", 1)[1]
    example = section.split("```python\n", 1)[1].split("```", 1)[0]
    Image.fromarray((np.random.default_rng(0).random((70, 90)) * 255).astype(np.uint8)).save(tmp_path / "scan.png")
    monkeypatch.chdir(tmp_path)
    names = {"mt": mt, "torch": torch, "model": mt.load_model(folder / "best.pt")}
    exec(example, names)
    assert names["x"].shape == (1, 32, 32) and 0 <= names["x"].min() and names["x"].max() <= 1
    assert names["probabilities"].shape == (3,) and torch.isclose(names["probabilities"].sum(), torch.tensor(1.0))
    assert names["lesion"].shape == (1, 1, 32, 32)
    assert names["on_scan"].shape == (1, 1, 70, 90)  # (height, width) of the 90 x 70 scan, not transposed
    smooth = torch.nn.functional.interpolate(names["outputs"]["seg"].softmax(1), size=(70, 90), mode="bilinear")
    assert torch.equal(names["on_scan"], smooth.argmax(1, keepdim=True))  # the probabilities resized, not the mask
    resized = torch.nn.functional.interpolate(names["on_scan"].float(), size=(32, 32), mode="nearest-exact")
    assert (resized == names["lesion"]).float().mean() > 0.9  # the same mask, at the scan's size
    with torch.no_grad():
        assert torch.equal(names["outputs"]["cls"], trained(names["x"][None])["cls"])


def test_read_image_prepares_a_file_as_the_datasets_prepare_theirs(tmp_path):
    from PIL import Image

    from mtlearn.data import read_image
    from mtlearn.data.real import Record, UltrasoundDataset

    rng = np.random.default_rng(1)
    Image.fromarray((rng.random((50, 60, 3)) * 255).astype(np.uint8)).save(tmp_path / "rgb.png")
    dataset = UltrasoundDataset("mine", "all", [Record(id="rgb", label=0, image=tmp_path / "rgb.png", masks=None,
                                                       group="rgb")], ("benign",), image_size=(32, 40), in_channels=3)
    assert torch.equal(read_image(tmp_path / "rgb.png", (32, 40), in_channels=3), dataset[0]["image"])
    for channels in (2, True, 3.0):
        with pytest.raises(ValueError, match=rf"in_channels must be 1 \(grey\) or 3 \(grey repeated\), got {channels}"):
            read_image(tmp_path / "rgb.png", 32, in_channels=channels)
    with pytest.raises(ValueError, match=r"image_size"):
        read_image(tmp_path / "rgb.png", 4)  # smaller than the datasets allow


def test_weights_loaded_into_a_model_built_for_another_image_size_are_warned_about(trained_run):
    """The weights fit (their shapes do not depend on the image size), so load_state_dict said nothing, and the
    model computed with other attention windows (a 64 px model read at 32 px: accuracy 0.656 against 0.641)."""
    from mtlearn.checkpoint import load_checkpoint

    folder, _ = trained_run
    wider = torch.nn.DataParallel(build_model("tiny", image_size=64, dfe="three", cls_head="last"))  # wrapped too
    with pytest.warns(UserWarning, match=r"best\.pt was trained in a model built with other settings \(image_size "
                                         r"\[32, 32\] then, \[64, 64\] now; window_size 2 then, 4 now\): .* "
                                         r"mt\.load_model\(path\) builds it as trained") as caught:
        load_checkpoint(folder / "best.pt", wider)
    assert caught[0].filename == __file__  # the line that loaded, not mtlearn's
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # built as trained, or other rates that eval mode does not use: nothing to say
        load_checkpoint(folder / "best.pt", build_model("tiny", image_size=32, dfe="three", cls_head="last"))
        load_checkpoint(folder / "best.pt", build_model("tiny", image_size=32, dfe="three", cls_head="last",
                                                        drop_path=0.2, dropout=0.1))
    with pytest.raises(ValueError, match=r"\(another preset, task list, channel or class count, DFE, classifier head "
                                         r"or attention path\?\)\. Build the model with the options of that run "
                                         r"\(mt\.load_model\(path\) builds it from the settings the checkpoint "
                                         r"records\)"):
        load_checkpoint(folder / "best.pt", build_model("tiny", image_size=32))  # without its DFE


def test_a_loaded_model_evaluated_channels_last_scores_exactly_what_fit_recorded(tmp_path):
    """evaluate(channels_last=True) converted the images only: fit's channels_last weights add in another order
    (seg/loss 2.7616551 against 2.7616550 recorded)."""
    from torch.utils.data import DataLoader, Subset

    import mtlearn as mt

    data = DataLoader(Subset(mt.data.load_dataset("synthetic", split="train", image_size=32), range(32)), batch_size=8)
    mt.seed_everything(0)  # weights whose sums show the order (at some, the two orders round alike)
    history = mt.fit(build_model("tiny", image_size=32), data, data, epochs=1, out_dir=tmp_path, progress=False,
                     channels_last=True, amp="off")
    recorded = history.to_frame().iloc[-1]
    scored = mt.evaluate(mt.load_model(tmp_path / "best.pt"), data, channels_last=True, amp="off")
    assert {k: scored[k] for k in ("seg/loss", "cls/loss", "seg/dice")} == {
        k: float(recorded[f"val/{k}"]) for k in ("seg/loss", "cls/loss", "seg/dice")}


def test_a_loaded_model_exports_with_torch_export_and_computes_the_same(trained_run):
    """README, "Using a trained model": torch.export captures the network, dict of outputs and all."""
    from mtlearn.mtl import load_model

    folder, _ = trained_run
    model = load_model(folder / "best.pt")
    x = torch.rand(2, 1, 32, 32)
    exported = torch.export.export(model, (x,)).module()
    with torch.no_grad():
        assert all(torch.allclose(v, exported(x)[k], atol=1e-6) for k, v in model(x).items())


def test_read_image_names_a_tensor_as_the_wrong_input():
    """Path(tensor) said "expected str, bytes or os.PathLike object, not Tensor": neither problem nor fix."""
    from mtlearn.data import read_image

    with pytest.raises(TypeError, match=r"read_image takes a file or an \(H, W\) NumPy array; a tensor is already"):
        read_image(torch.rand(32, 32), 32)
    assert read_image(np.full((32, 32), 0.5, np.float32), 16).shape == (1, 16, 16)


def test_forward_task_is_one_entry_of_forward_computed_alone():
    model = tiny_model(tasks=("seg", "cls", "recon")).eval()
    x = torch.rand(2, 1, 32, 32)
    outputs = model(x)
    ran = []
    for task in ("seg", "recon"):
        model.decoders[task].register_forward_hook(lambda module, args, out, task=task: ran.append(task))
    for task in ("seg", "cls", "recon"):
        ran.clear()
        assert torch.equal(model.forward_task(x, task), outputs[task])
        assert ran == ([task] if task != "cls" else [])  # the other tasks' decoders do not run
    with pytest.raises(ValueError, match=r"the model has no task 'depth'; its tasks: \('seg', 'cls', 'recon'\)"):
        model.forward_task(x, "depth")
