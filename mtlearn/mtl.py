"""The multi-task UNet: one ResFormer encoder shared by segmentation, classification and denoising.

    model = build_model("course", tasks=("seg", "cls"))      # a MultiTaskUNet
    out = model(images)           # {"seg": (B, 2, H, W), "cls": (B, 3)}

    single_task_model("seg")      # the same encoder with one head: the single-task baseline
    monai_baseline("swinunetr")   # an outside baseline from MONAI, returning {"seg": ...}

Presets (PRESETS) fix the encoder size: "paper" is Bui et al.'s network (GPU); "course", half its
width, suits a GPU or a patient CPU; "tiny", a quarter of it, is what notebook 01 trains in its
smoke and course profiles (six trainings in minutes on two CPU cores) and what the tests use.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from mtlearn.blocks import check_dilations
from mtlearn.encoder import ResFormerConfig, ResFormerEncoder, check_image, init_weights
from mtlearn.heads import (DFE_MODES, MultiScaleClassificationHead, ReconstructionHead, SegmentationHead,
                           UNetDecoder)
from mtlearn.losses import check_tasks
from mtlearn.utils import check_int, check_options, check_size, is_int

TASKS = ("seg", "cls", "recon")  # segmentation, classification, reconstruction (denoising)
CLS_HEADS = ("multiscale", "last")  # classifier reads the last two encoder stages, or the last one only


@dataclass
class MultiTaskConfig(ResFormerConfig):
    """Encoder fields (ResFormerConfig) plus which tasks to build and how their heads look."""

    tasks: tuple[str, ...] = ("seg", "cls")  # heads to build, any non-empty subset of TASKS; output keys
    num_classes: int = 3  # image classes for "cls" (synthetic ultrasound: normal, benign, malignant)
    seg_classes: int = 2  # mask classes for "seg" (background, lesion), softmax logits
    dfe: str = "none"  # skip refinement in the seg decoder: "none", "three" (paper's DFE) or "four" (ASPP-like)
    dilations: tuple[int, ...] = (6, 12, 18)  # DFE dilation rates, one branch each
    cls_head: str = "multiscale"  # "multiscale" (last two stages, as published) or "last" (last stage only)
    cls_hidden: int = 32  # width of the classifier's bottleneck layer (paper: 32)

    def __post_init__(self):
        super().__post_init__()
        self.tasks = check_tasks(self.tasks)  # "seg" is one task; None, unknown or repeated names are refused
        if self.dfe not in DFE_MODES:
            raise ValueError(f"unknown DFE mode {self.dfe!r}; expected one of {DFE_MODES}")
        if self.cls_head not in CLS_HEADS:
            raise ValueError(f"unknown cls_head {self.cls_head!r}; expected one of {CLS_HEADS}")
        for name in ("num_classes", "seg_classes"):  # >= 2: softmax logits; a float (3.5) fails inside nn.Linear
            if is_int(getattr(self, name)) and getattr(self, name) == 1:
                example = "background and lesion" if name == "seg_classes" else "benign and malignant"
                raise ValueError(f"{name} must be >= 2, got 1: the head gives one softmax logit per class, so a "
                                 f"yes/no task has 2 classes (e.g. {example})")
            setattr(self, name, check_int(name, getattr(self, name), 2))  # np.int64(3) from a sweep: a plain int
        self.cls_hidden = check_int("cls_hidden", self.cls_hidden, 1)  # 32.0 failed inside torch.empty
        self.dilations = check_dilations(self.dilations)


class MultiTaskUNet(nn.Module):
    """ResFormer multi-task UNet (Bui et al., arXiv 2412.00351, 2024), with UMS-Rep's denoising task.

    Hard parameter sharing: one encoder computes features once per image and every task reads
    them. Bui et al. pair segmentation (a UNet decoder with DFE skips) with classification (a
    multi-scale head on the last two stages): the classification loss shapes the encoder's deep
    features and the decoder's skips keep segmentation sharp. UMS-Rep (Zamzmi et al., 2021) adds
    denoising as a task that needs no labels. Each dense task ("seg", "recon") gets its own
    decoder, so the shared representation is exactly the encoder (`.encoder`,
    `shared_parameters()`), which is what UMS-Rep transfers and fine-tunes.

        x (B, C, H, W) -> encoder -> 4 maps -> {"seg": (B, seg_classes, H, W),
                                                "cls": (B, num_classes),
                                                "recon": (B, C, H, W)}   (keys = config.tasks)
    """

    def __init__(self, config: MultiTaskConfig):
        super().__init__()
        self.config = config
        self.tasks = config.tasks
        self.encoder = ResFormerEncoder(config)
        widths = self.encoder.out_channels
        self.decoders = nn.ModuleDict()
        self.heads = nn.ModuleDict()
        for task in self.tasks:
            if task == "seg":
                self.decoders["seg"] = UNetDecoder(widths, config.dfe, config.dilations)
                self.heads["seg"] = SegmentationHead(widths[0], config.seg_classes)
            elif task == "recon":
                # DFE's wide dilations add lesion context; denoising is local, so its decoder has plain skips.
                self.decoders["recon"] = UNetDecoder(widths, "none")
                self.heads["recon"] = ReconstructionHead(widths[0], config.in_channels)
            else:  # "cls"
                read = widths[-2:] if config.cls_head == "multiscale" else widths[-1:]
                self.heads["cls"] = MultiScaleClassificationHead(read, config.num_classes, config.cls_hidden,
                                                                 config.dropout)
        self.decoders.apply(init_weights)
        self.heads.apply(init_weights)

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """x: (B, in_channels, H, W) -> the encoder's 4 maps at H/2, H/4, H/8, H/16."""
        return self.encoder(x)

    def forward_heads(self, features: list[Tensor]) -> dict[str, Tensor]:
        """Encoder maps (B, C_i, H/2^i, W/2^i), i = 1..4 -> {task: output}, one entry per task the model
        was built with: "seg" (B, seg_classes, H, W), "cls" (B, num_classes), "recon" (B, in_channels, H, W)."""
        return {task: self._task_head(task, features) for task in self.tasks}

    def forward_task(self, x: Tensor, task: str) -> Tensor:
        """x: (B, in_channels, H, W) -> one task's output (as in forward's dict), computing that task's decoder
        and head only: what explaining one head needs (attribution), without the other decoders' work."""
        if task not in self.heads:
            raise ValueError(f"the model has no task {task!r}; its tasks: {self.tasks}")
        return self._task_head(task, self.forward_features(x))

    def _task_head(self, task: str, features: list[Tensor]) -> Tensor:
        """Encoder maps -> the output of `task`: through its decoder when it has one (dense tasks)."""
        head = self.heads[task]
        return head(self.decoders[task](features)) if task in self.decoders else head(features)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x: (B, in_channels, H, W), H and W divisible by 16 -> {task: output} (see the class docstring)."""
        return self.forward_heads(self.forward_features(x))

    def shared_parameters(self):
        """The parameters every task uses: the encoder's (for gradient-surgery weighting methods)."""
        return self.encoder.parameters()


# Encoder sizes. Parameter counts for tasks ("seg", "cls"), 1 input channel, 3 classes, dfe "none";
# forward GFLOPs per image (mtlearn.utils.count_flops: 2 per multiply-add, attention included).
PRESETS: dict[str, dict] = {
    # Bui et al.'s network: ResNet-34 + Swin (embed 64, heads 2/4/8/16).   33.65M params at 224 px, 48.7 GFLOPs
    # (dfe="three": 44.11M, dfe="four": 56.29M, use_attention=False: 23.54M; + "recon": 35.90M)
    "paper": dict(widths=(64, 128, 256, 512), cnn_depths=(3, 4, 6, 3), attn_depths=(2, 2, 2, 2),
                  num_heads=(2, 4, 8, 16), drop_path=0.1),
    # Half width, one BasicBlock and two Swin blocks per stage, head dim 32.   4.33M params at 128 px, 2.1 GFLOPs
    # (dfe="three": 6.95M, dfe="four": 10.00M, use_attention=False: 1.80M; + "recon": 4.90M)
    "course": dict(widths=(32, 64, 128, 256), cnn_depths=(1, 1, 1, 1), attn_depths=(2, 2, 2, 2),
                   num_heads=(1, 2, 4, 8), drop_path=0.05),
    # Notebook 01 on a CPU, tests: quarter width, one block each, head dim 16.  0.83M params at 64 px, 0.11 GFLOPs
    # (dfe="three": 1.48M, dfe="four": 2.25M, use_attention=False: 0.455M)
    "tiny": dict(widths=(16, 32, 64, 128), cnn_depths=(1, 1, 1, 1), attn_depths=(1, 1, 1, 1),
                 num_heads=(1, 2, 4, 8), drop_path=0.0),
}


def build_model(preset: str = "course", tasks: Sequence[str] = ("seg", "cls"), in_channels: int = 1,
                num_classes: int = 3, seg_classes: int = 2, image_size: int | tuple[int, int] = 128,
                **overrides) -> MultiTaskUNet:
    """A MultiTaskUNet from a named preset; `overrides` replace any MultiTaskConfig field.

    preset: a model size from PRESETS, not a notebook profile: "tiny" (0.83M parameters; what the notebooks
    train in their smoke and course profiles, and `python -m mtlearn.train`'s default), "course" (4.33M, the
    default here: twice the width, five times the parameters) or "paper" (33.65M, Bui et al.'s network).

    build_model("course", tasks=("seg", "cls", "recon"), dfe="three")
    build_model("paper", in_channels=3, image_size=224)
    """
    if not isinstance(preset, str) or preset not in PRESETS:  # ["tiny"]: "unhashable type: 'list'"
        # a notebook's profile is not a preset (the course profile trains "tiny"): build_model(run.profile)
        hint = ("; 'smoke' is a notebook profile, not a model size (its notebooks use 'tiny')"
                if preset == "smoke" else "")
        raise ValueError(f"unknown preset {preset!r}; expected one of {tuple(PRESETS)}{hint}")
    check_options(MultiTaskConfig, overrides, "model option(s)")
    settings = {**PRESETS[preset], **overrides}
    tasks = check_tasks(tasks)
    config = MultiTaskConfig(in_channels=in_channels, image_size=image_size, tasks=tasks,
                             num_classes=num_classes, seg_classes=seg_classes, **settings)
    return MultiTaskUNet(config)


def single_task_model(task: str, preset: str = "course", in_channels: int = 1, num_classes: int = 3,
                      seg_classes: int = 2, image_size: int | tuple[int, int] = 128, **overrides) -> MultiTaskUNet:
    """The single-task baseline: the same encoder as build_model, with the head of one task."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    return build_model(preset, (task,), in_channels, num_classes, seg_classes, image_size, **overrides)


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> MultiTaskUNet:
    """The MultiTaskUNet a checkpoint of `fit` holds (best.pt, last.pt), built again from the settings it
    records (preset, image size, tasks, classes, DFE ...) and returned in eval mode.

        model = mt.load_model("runs/a/best.pt")
        class_names = mt.checkpoint.load_checkpoint("runs/a/best.pt")["class_names"]  # None if the data had none

    Its inputs are prepared as in training: (B, in_channels, H, W) floats scaled to 0..1, at the recorded
    `model.config.image_size` (the attention windows follow it).
    """
    from mtlearn.checkpoint import load_checkpoint, load_weights

    state = load_checkpoint(path, map_location=map_location)
    settings = state.get("model_config")
    if not isinstance(settings, Mapping):
        raise ValueError(f"{path} records no model settings (written by fit before they were saved, or a model other "
                         "than build_model's): build the model as it was trained, e.g. build_model(preset, "
                         "image_size=..., num_classes=...), and load it with load_checkpoint(path, model)")
    unknown = sorted(set(settings) - {f.name for f in fields(MultiTaskConfig)})
    if unknown:  # a checkpoint of a later version, whose networks have settings this one cannot build
        raise ValueError(f"{path} records model settings this version of mtlearn does not know ({unknown}): update "
                         "mtlearn to the version that trained it")
    model = MultiTaskUNet(MultiTaskConfig(**settings))
    load_weights(model, state["model"], f"cannot load {path} into the model its settings describe")
    return model.to(map_location).eval()


# ---------------------------------------------------------------------------------------------
# Outside baselines from MONAI
# ---------------------------------------------------------------------------------------------

MONAI_MODELS = ("unet", "swinunetr")


class MonaiBaseline(nn.Module):
    """A MONAI segmentation network behind the mtlearn interface: forward returns {"seg": logits}.

    Outside baselines keep us honest: a well-known UNet (Ronneberger et al., 2015, MONAI's
    residual form) and SwinUNETR (Hatamizadeh et al., 2022), trained by the same loop.
    `.encoder` lists the modules of the contracting path (its `shared_parameters()`, for the loss
    weightings); UMS-Rep's freezing and transfer need a ResFormer encoder and refuse these.
    """

    tasks = ("seg",)

    def __init__(self, name: str, net: nn.Module, in_channels: int, stride: int, instance_norm: bool = True):
        super().__init__()
        self.name = name
        self.net = net
        self.in_channels = in_channels
        self.stride = stride
        self.instance_norm = instance_norm  # which cannot normalise a 1x1 map at the bottom

    @property
    def encoder(self) -> nn.ModuleList:
        """The contracting path (not registered twice: a view built on each access)."""
        if self.name == "swinunetr":
            net = self.net
            return nn.ModuleList([net.swinViT, net.encoder1, net.encoder2, net.encoder3, net.encoder4, net.encoder10])
        from monai.networks.layers import SkipConnection

        parts, level = [], self.net.model
        while True:  # MONAI's UNet nests levels as Sequential(down, SkipConnection(next level), up)
            parts.append(level[0])
            inner = level[1].submodule
            if not (isinstance(inner, nn.Sequential) and len(inner) == 3 and isinstance(inner[1], SkipConnection)):
                parts.append(inner)  # the bottom layer
                return nn.ModuleList(parts)
            level = inner

    def shared_parameters(self):
        """The contracting path's parameters."""
        return self.encoder.parameters()

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x: (B, in_channels, H, W), H and W divisible by the stride -> {"seg": (B, seg_classes, H, W)}."""
        check_image(x, self.in_channels, self.stride, dtype=next(self.net.parameters()).dtype)
        if self.instance_norm:
            _check_bottom(tuple(x.shape[-2:]), self.name, self.stride, "image size")
        return {"seg": self.net(x)}


def _check_bottom(size: tuple[int, int], name: str, stride: int, what: str) -> None:
    """Refuse a size that leaves one pixel at the bottom of the network, where instance normalisation fails with
    torch's "Expected more than 1 spatial element when training" (in eval mode as well)."""
    if size[0] * size[1] <= stride * stride:
        raise ValueError(f"{what} {size[0]}x{size[1]} would leave MONAI's {name} a 1x1 map at its bottom (stride "
                         f"{stride}), which instance normalisation cannot normalise; use at least {2 * stride} on a "
                         "side")


def monai_baseline(name: str = "unet", in_channels: int = 1, seg_classes: int = 2,
                   image_size: int | tuple[int, int] = 128, **kwargs) -> MonaiBaseline:
    """MONAI's 2-D UNet or SwinUNETR wrapped to return {"seg": logits}; kwargs go to the MONAI class.

    "unet": channels (16, 32, 64, 128, 256), strides 2, two residual units (MONAI's tutorial
    network, 1.6M params); inputs divisible by 16 (the product of `strides`).
    "swinunetr": spatial_dims=2, feature_size=48 (25.1M params); inputs divisible by 32. Needs einops.
    With instance normalisation (both networks' default), a side must be at least twice the stride:
    one pixel at the bottom cannot be normalised.
    seg_classes >= 2: softmax logits with a background channel, as the ResFormer's.
    """
    if name not in MONAI_MODELS:
        raise ValueError(f"unknown MONAI baseline {name!r}; expected one of {MONAI_MODELS}")
    from monai.networks.nets import UNet, SwinUNETR

    size = check_size(image_size)
    in_channels, seg_classes = check_int("in_channels", in_channels, 1), check_int("seg_classes", seg_classes, 2)
    if name == "unet":
        options = dict(channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2) | kwargs
        if len(options["channels"]) != len(options["strides"]) + 1:  # MONAI would only warn, and build another net
            raise ValueError(f"MONAI's UNet needs one stride per downsampling, one fewer than channels; got "
                             f"channels={tuple(options['channels'])} and strides={tuple(options['strides'])}")
        strides = tuple(options["strides"])
        if not all(is_int(s) and s >= 1 for s in strides):
            raise ValueError(f"MONAI's UNet takes whole-number strides >= 1, one per downsampling; got "
                             f"strides={strides}")
        stride = math.prod(int(s) for s in strides)  # the inputs' sides must divide by it, not by 2 ** levels
        norm = options.get("norm", "instance")
        net = UNet(spatial_dims=2, in_channels=in_channels, out_channels=seg_classes, **options)
    else:  # "swinunetr"
        try:
            import einops  # noqa: F401  (SwinUNETR needs it at run time; fail here, not in the first forward)
        except ImportError as error:
            raise ImportError("monai_baseline('swinunetr') needs einops: pip install einops") from error
        stride = 32
        options = dict(feature_size=48) | kwargs
        norm = options.get("norm_name", "instance")
        net = SwinUNETR(in_channels=in_channels, out_channels=seg_classes, spatial_dims=2, **options)
    if any(s % stride for s in size):
        raise ValueError(f"image_size {size} is not divisible by {name}'s stride {stride}; use a multiple of {stride}")
    instance_norm = "instance" in str(norm[0] if isinstance(norm, tuple) else norm).lower()  # MONAI's default
    if instance_norm:
        _check_bottom(size, name, stride, "image_size")
    return MonaiBaseline(name, net, in_channels, stride, instance_norm)
