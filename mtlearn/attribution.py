"""Attribution maps for every head of a multi-task model, with Captum, and the checks that keep them honest.

Captum explains one number per sample. A multi-task model returns a dict of whole tensors, so each
head is first wrapped into a scalar-per-sample function (parts first in this file):

    head     wrapper              the number explained, per sample
    "cls"    ClassLogit           the logit of a target class (default: the predicted one)
    "seg"    LesionScore          lesion log-odds summed over a region (default: the predicted lesion)
    "recon"  ReconstructionError  mean squared denoising error over a region (default: the whole image)

then handed to one of five methods (`Explainer.attribute`, or the one-call `attribute`):

    "ig"          Integrated Gradients (Sundararajan et al. 2017) from a flat grey image, signed
    "saliency"    |gradient| (Simonyan et al. 2014), unsigned
    "smoothgrad"  SmoothGrad (Smilkov et al. 2017): |gradient| averaged over noisy copies, written out
                  (noise scaled to each image's own range; Captum's NoiseTunnel uses one for the batch)
    "gradcam"     LayerGradCam (Selvaraju et al. 2017) on the last encoder stage, upsampled to the input
                  (`upsample_cells`: where each coarse cell is placed); one cell covers the stage's stride
                  (16 or 32 px), so it spreads over pixels the model ignores, which the others leave at 0
    "occlusion"   Occlusion (Zeiler & Fergus 2014): score drop when a square patch is greyed out, signed

Every map comes back as (B, 1, H, W): input channels are summed. Two quantitative checks ask
whether a map looks where it should (`mask_share`, `pointing_game`), and the parameter-
randomisation test of Adebayo et al. (2018) asks whether it depends on the model at all
(`cascading_randomisation`). The figures (`plot_attributions`, `plot_scores`, `plot_randomisation`)
draw maps with a transparent low end, on colour scales shared where panels are compared
(`colour_limit`); `AttributionExplorer` is the interactive viewer.

Captum's hooks break on in-place activations (nn.ReLU(inplace=True) overwrites the very tensor a
hook has saved), so every explainer works on a copy made by `without_inplace`.
"""

from __future__ import annotations

import copy
import inspect
import numbers
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib import patheffects
from matplotlib.artist import Artist
from matplotlib.colors import ListedColormap, is_color_like, to_hex
from torch import Tensor, nn
from tqdm.auto import tqdm

from mtlearn.checkpoint import WRAPPER_PREFIXES, unwrapped_model
from mtlearn.encoder import ResFormerEncoder, check_floating, init_weights, unscaled_range
from mtlearn.mtl import MultiTaskUNet
from mtlearn.plots import _array, _draw_image, _image
from mtlearn.utils import _kind, check_int, check_number, find_class_names, is_finite, is_number, user_stacklevel
from mtlearn.widgets import Explorer, say_in, show_in

HEADS = ("cls", "seg", "recon")
METHODS = ("ig", "saliency", "smoothgrad", "gradcam", "occlusion")
SIGNED_METHODS = ("ig", "occlusion")  # the others return non-negative maps
# IG's maps should add up to score(image) - score(baseline); off by more than this share, a warning says so
# (the course's grey baseline at 32 steps: within 0.1-5 % for every head; from black, up to 31 % seen)
COMPLETENESS_TOLERANCE = 0.1
MASS_MODES = ("positive", "absolute")


def _check_head(head) -> None:
    """Refuse a head that is none of HEADS; an array (labels passed where the head goes) by its shape only."""
    if isinstance(head, str) and head in HEADS:
        return
    if isinstance(head, str):
        raise ValueError(f"unknown head {head!r}; expected one of {HEADS}")
    shape = f" of shape {tuple(head.shape)}" if hasattr(head, "shape") else ""
    raise ValueError(f"the head must be one of {HEADS}, got {type(head).__name__}{shape} (class labels or a region "
                     "go in target=)")


# ----------------------------------------------------------------------------------------------
# in-place activations


def without_inplace(model: nn.Module) -> nn.Module:
    """A deep copy of `model` with every `inplace=True` switched off (ReLU, LeakyReLU, Dropout ...).

    Why: an in-place activation overwrites its input, which is often the output another module
    produced and a Captum hook captured; gradients or layer attributions are then computed from the
    overwritten tensor (or autograd raises "modified by an inplace operation"). In-place calls
    written inside a forward (F.relu(x, inplace=True), x += y) cannot be switched off from outside.
    The original model is left untouched.
    """
    model = copy.deepcopy(model)
    for module in model.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False
    return model


def count_inplace(model: nn.Module) -> int:
    """How many modules of `model` have `inplace=True`."""
    return sum(getattr(m, "inplace", False) is True for m in model.modules())


# ----------------------------------------------------------------------------------------------
# heads as scalar-per-sample functions


def _task_output(model: nn.Module, images: Tensor, key: str) -> Tensor:
    """The `key` output of `model` on `images`. A multi-task model that can compute one task alone
    (MultiTaskUNet.forward_task) does so: explaining the classifier then skips both decoders, which
    made occlusion and IG up to 1.5 times slower for outputs thrown away; the numbers are the same. Not when
    hooks sit on the model itself (forward_task would pass them by), nor through a wrapper such as
    torch.compile's, whose forward is the compiled one."""
    hooked = bool(getattr(model, "_forward_hooks", None) or getattr(model, "_forward_pre_hooks", None))
    if hasattr(type(model), "forward_task") and key in getattr(model, "tasks", ()) and not hooked:
        return model.forward_task(images, key)
    return _head_output(model(images), key)


def _head_output(outputs, key: str) -> Tensor:
    """Pick `key` from a dict of outputs; a model that returns one tensor is its own head."""
    if isinstance(outputs, Tensor):
        return outputs
    if not isinstance(outputs, Mapping):  # e.g. a tuple (cls, seg): which one is the head is not known
        raise TypeError(f"the model returns a {type(outputs).__name__}; attribution needs one tensor or a dict of "
                        "outputs: wrap the model so that it returns e.g. {'cls': logits}")
    if key not in outputs:
        raise ValueError(f"the model returns no {key!r} output (it returns {sorted(outputs)}); "
                         "pass keys={head: name} to say which output belongs to the head")
    return outputs[key]


class ClassLogit(nn.Module):
    """The logit of one class per sample: the classification head as Captum's forward function.

    Logits rather than probabilities: a softmax saturates, and a saturated output has near-zero
    gradients everywhere, which makes gradient maps look empty (Simonyan et al. 2014 explain the
    unnormalised class score for the same reason).

    images: (B, C, H, W), target: (B,) class indices -> (B,)
    """

    def __init__(self, model: nn.Module, key: str = "cls"):
        super().__init__()
        self.model = model
        self.key = key

    def forward(self, images: Tensor, target: Tensor) -> Tensor:
        """images: (B, C, H, W), target: (B,) class indices -> (B,) class scores"""
        logits = _task_output(self.model, images, self.key)  # (B, num_classes)
        return logits.gather(1, target.view(-1, 1)).squeeze(1)  # (B, 1) picked, then (B,)


class LesionScore(nn.Module):
    """Lesion evidence summed over a region, one number per sample: the segmentation head for Captum.

    Captum needs a scalar per sample, a segmentation head gives one logit map per class. We sum the
    lesion log-odds, logit_lesion - logsumexp(other logits) = log p / (1 - p), over the region
    (usually the predicted lesion, fixed from the unperturbed image). Log-odds rather than the raw
    lesion logit because a softmax ignores a shift shared by all classes: only the difference
    decides the predicted mask. With a single output channel (sigmoid) the logit is the log-odds.

    images: (B, C, H, W), region: (B, 1, H, W) 0/1 -> (B,)
    """

    def __init__(self, model: nn.Module, key: str = "seg", lesion_class: int = 1):
        super().__init__()
        self.model = model
        self.key = key
        self.lesion_class = lesion_class

    def forward(self, images: Tensor, region: Tensor) -> Tensor:
        """images: (B, C, H, W), region: (B, 1, H, W) 0/1 -> (B,) summed lesion log-odds"""
        logits = _task_output(self.model, images, self.key)  # (B, seg_classes, H, W)
        if logits.shape[1] == 1:
            log_odds = logits[:, 0]
        else:
            others = torch.cat([logits[:, :self.lesion_class], logits[:, self.lesion_class + 1:]], dim=1)
            log_odds = logits[:, self.lesion_class] - others.logsumexp(dim=1)  # (B, H, W)
        if log_odds.dtype in (torch.float16, torch.bfloat16):  # a float16 sum overflowed to inf at 128 px
            log_odds = log_odds.float()
        return (log_odds * region[:, 0]).flatten(1).sum(1)


class ReconstructionError(nn.Module):
    """Mean squared denoising error over a region, one number per sample: the recon head for Captum.

    The map then answers "which input pixels make the reconstruction wrong here?". `reference` is
    the clean target when there is one (synthetic data), otherwise the noisy input itself (the map
    then shows what drives the change the denoiser makes).

    images: (B, C, H, W), region: (B, 1, H, W) 0/1, reference: (B, C, H, W) -> (B,)
    """

    def __init__(self, model: nn.Module, key: str = "recon"):
        super().__init__()
        self.model = model
        self.key = key

    def forward(self, images: Tensor, region: Tensor, reference: Tensor) -> Tensor:
        """images: (B, C, H, W), region: (B, 1, H, W) 0/1, reference: (B, C, H, W) -> (B,) mean squared error"""
        recon = _task_output(self.model, images, self.key)  # (B, C, H, W)
        squared = ((recon - reference) ** 2).mean(dim=1)  # (B, H, W)
        area = region[:, 0].flatten(1).sum(1).clamp_min(1.0)
        return (squared * region[:, 0]).flatten(1).sum(1) / area


WRAPPERS = {"cls": ClassLogit, "seg": LesionScore, "recon": ReconstructionError}


# ----------------------------------------------------------------------------------------------
# the explainer: one prepared copy of the model, every head, every method


def default_layer(model: nn.Module) -> str:
    """Name of the layer Grad-CAM reads by default: the last (deepest) encoder stage.

    Why there: Selvaraju et al. (2017) take the last convolutional features, the most semantic ones
    that still have a spatial layout. In the multi-task UNet the last encoder stage is also the one
    representation every head depends on (the classifier pools it, the decoder starts from it), so
    maps for different heads are comparable. It is coarse (H/16), hence the upsampling. It is not
    all a head sees: the multi-scale classifier also pools the stage before directly, and the
    decoder reads every skip, so evidence that takes those paths is not in the map.
    """
    encoder = getattr(model, "encoder", None)
    stages = getattr(encoder, "stages", None)
    if isinstance(stages, (nn.ModuleList, nn.Sequential)) and len(stages) > 0:
        return f"encoder.stages.{len(stages) - 1}"
    raise ValueError(f"{type(model).__name__} has no encoder.stages to take the Grad-CAM layer from; "
                     "pass layer='<module name>' (see model.named_modules()), a module whose output is (B, C, h, w)")


class Explainer:
    """Attribution maps for each head of `model`, computed on a private copy of it.

    The copy has in-place activations switched off (`without_inplace`), is in eval mode (BatchNorm
    statistics fixed, dropout off: the map must explain the deterministic model) and does not track
    gradients for its parameters (Captum only needs input gradients; this saves memory and time).
    It is taken when the Explainer is built: after training the model further (a training cell run
    again), build a new Explainer, or its maps explain the weights the model had before.

    A model inside torch.compile's (or DistributedDataParallel's) wrapper is explained through the model
    itself: a compiled graph skips hooks added after it was traced (Grad-CAM's), and its module names
    gain a prefix ("_orig_mod.") that the randomisation test would count as a level.

    layer: Grad-CAM layer, a module name (the model's own, or as its wrapper lists it) or a module of
    `model` (None: `default_layer`).
    keys: which model output each head reads, e.g. {"cls": "logits_a"} for a DisentangleNet.

    explainer = Explainer(model); maps = explainer.attribute(images, head="seg", method="ig")
    """

    def __init__(self, model: nn.Module, layer: str | nn.Module | None = None, keys: Mapping[str, str] | None = None):
        if isinstance(model, Explainer):  # e.g. cascading_randomisation(explainer, ...): "build the model" misled
            raise TypeError("got an Explainer where the model goes; pass the model it explains (a new Explainer is "
                            "made from it)")
        if not isinstance(model, nn.Module):
            raise TypeError(f"Explainer expects the model, an nn.Module, got {type(model).__name__}; for saved "
                            "weights build the model and load_state_dict first: model = mtlearn.build_model(...); "
                            "model.load_state_dict(state)")
        inner = unwrapped_model(model)
        if inner is not model and isinstance(layer, str):  # named as the wrapper lists it: "_orig_mod.encoder..."
            own = {name for name, _ in inner.named_modules()}  # the model may have a module called "module" itself
            while layer not in own and layer.startswith(WRAPPER_PREFIXES):
                layer = layer.split(".", 1)[1]
        model = inner
        unknown = sorted(set(keys or {}) - set(HEADS))
        if unknown:
            raise ValueError(f"keys name unknown head(s) {unknown}; the heads are {HEADS}, "
                             "e.g. keys={'cls': 'logits_a'} (head: the model output it reads)")
        if isinstance(layer, nn.Module):
            names = {module: name for name, module in model.named_modules()}
            if layer not in names:
                raise ValueError("layer must be a module of `model` (or its name); the module given is not part of it")
            layer = names[layer]
        weights = [p for p in model.parameters() if p.is_floating_point()]
        if not weights:
            raise ValueError(f"Explainer needs a model with floating-point weights; {type(model).__name__} has none "
                             "(attribution explains a trained network)")
        with torch.inference_mode(False):  # copied inside inference_mode, the weights could not join autograd
            self.model = without_inplace(model).eval().requires_grad_(False)
        self.layer_name = layer
        self.keys = {head: head for head in HEADS} | dict(keys or {})
        self.device, self.dtype = weights[0].device, weights[0].dtype  # the images are cast to both
        self.warned_unscaled = False  # the 0..255 warning comes once per explainer, not once per batch
        self.warned_incomplete = False  # so does IG's completeness warning (see _ig)
        self._num_classes: int | None = None  # of the cls head, read from its first output

    def __repr__(self) -> str:  # was "<mtlearn.attribution.Explainer object at 0x...>"
        layer = self.layer_name
        if layer is None:
            try:
                layer = f"{default_layer(self.model)} (the default)"
            except ValueError:  # no encoder.stages: Grad-CAM needs layer=
                layer = "none (give layer= for Grad-CAM)"
        return f"Explainer({type(self.model).__name__}: a copy in eval mode on {self.device}; Grad-CAM layer {layer})"

    def head(self, head: str) -> nn.Module:
        """The scalar-per-sample wrapper of `head` around the prepared copy."""
        _check_head(head)
        return WRAPPERS[head](self.model, self.keys[head])

    @property
    def layer(self) -> nn.Module:
        name = self.layer_name if self.layer_name is not None else default_layer(self.model)
        try:
            return self.model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the model has no module named {name!r}; pick one from model.named_modules()") from None

    @torch.inference_mode(False)
    def forward_args(self, images: Tensor, head: str, target=None, reference: Tensor | None = None) -> tuple:
        """What the head's wrapper takes after the images, with defaults filled in from the model.

        cls:   target None -> the predicted class; an int -> that class for every sample; (B,) ints.
        seg:   target None -> the predicted lesion mask; else a (B, 1, H, W) region.
        recon: target None -> the whole image; else a (B, 1, H, W) region. reference None -> images.
        Everything is fixed here, from the unperturbed images, so that every perturbed copy Captum
        evaluates is scored against the same target. The tensors returned are copies made outside
        inference mode: a target made inside torch.inference_mode (labels moved to the GPU in an
        evaluation loop) cannot be saved for a backward pass, and failed every method but IG and occlusion.
        """
        return tuple(arg.clone() for arg in self._forward_args(images, head, target, reference))

    @torch.no_grad()
    def _forward_args(self, images: Tensor, head: str, target=None, reference: Tensor | None = None) -> tuple:
        _check_head(head)
        images = self._check_images(images)
        B, _, H, W = images.shape
        if head == "cls":
            if target is None or self._num_classes is None:
                logits = self.head_output(images, "cls")  # (B, num_classes)
                self._num_classes = logits.shape[1]
                if target is None:
                    target = logits.argmax(1)
            target = _class_indices(target, B).to(self.device).flatten()
            if target.numel() == 1:
                target = target.expand(B)
            if target.shape != (B,):
                raise ValueError(f"cls target must be an int or {B} class indices, got shape {tuple(target.shape)}")
            if bool(((target < 0) | (target >= self._num_classes)).any()):
                raise ValueError(f"cls target must be class indices in 0..{self._num_classes - 1}, "
                                 f"got {target.tolist()}")
            return (target,)
        if target is None and head == "seg":
            logits = self.head_output(images, "seg")
            lesion = logits[:, :1] > 0 if logits.shape[1] == 1 else logits.argmax(1, keepdim=True) == 1
            target = lesion.float()  # (B, 1, H, W) predicted lesion
        elif target is None:
            target = torch.ones(B, 1, H, W, device=self.device)
        # 0/1: a 0/255 mask would scale the score 255 times, a soft one reweight it, without a word
        region = _binary_mask(torch.as_tensor(target, device=self.device), f"{head} target")
        if region.dim() == 3:
            region = region.unsqueeze(1)  # (B, 1, H, W)
        if region.shape != (B, 1, H, W):
            raise ValueError(f"{head} target must be a region of shape {(B, 1, H, W)}, got {tuple(region.shape)}")
        if head == "seg":
            return (region,)
        if reference is not None:
            check_floating(reference, "reference")  # compared with the 0..1 reconstruction
        reference = images if reference is None else reference.to(self.device, self.dtype)
        if reference.shape != images.shape:
            raise ValueError(f"reference must have the images' shape {tuple(images.shape)}, "
                             f"got {tuple(reference.shape)}")
        return (region, reference)

    @torch.no_grad()
    def head_output(self, images: Tensor, head: str) -> Tensor:
        """The raw output of `head` for `images` (no gradients)."""
        with self._exact():
            return _task_output(self.model, self._check_images(images), self.keys[head])

    @torch.inference_mode(False)  # a caller's inference_mode or no_grad block: gradients are needed here
    @torch.enable_grad()
    def attribute(self, images: Tensor, head: str = "cls", target=None, method: str = "ig", *,
                  reference: Tensor | None = None, **method_kw) -> Tensor:
        """Attribution map of `head` for each image by `method`.

        images: (B, C, H, W) -> (B, 1, H, W), input channels summed, on the images' device; it may be
        called inside torch.no_grad() or torch.inference_mode() (evaluation code often is).
        target: see `forward_args` (a class for "cls", a region for "seg" and "recon").
        method_kw: the method's own settings, e.g. n_steps=16 for "ig", window=8 for "occlusion"
        (see `_ig`, `_smoothgrad`, `_gradcam`, `_occlusion`).
        """
        checked = self._check_images(images)
        self.check_options(method, checked.shape[-2:], **method_kw)
        found = None if self.warned_unscaled else unscaled_range(checked)
        if found is not None:  # the maps would explain inputs the model never saw
            self.warned_unscaled = True
            warnings.warn(f"the images range from {found[0]:g} to {found[1]:g}, which looks like raw, unscaled "
                          "intensities (e.g. 0..255), but the course's models learn on images scaled to 0..1: "
                          "explain images as the model saw them in training (8-bit: image / 255; a model trained "
                          "on this range on purpose: ignore this warning)", stacklevel=user_stacklevel())
        run = getattr(self, f"_{method}")
        device = images.device  # the maps go back where the images came from
        images = checked
        with self._exact():
            args = self.forward_args(images, head, target, reference)
            images = images.detach().clone().requires_grad_(True)  # Captum differentiates w.r.t. this copy
            maps = run(self.head(head), images, args, **method_kw)
        return maps.sum(dim=1, keepdim=True).detach().to(device)  # (B, 1, H, W)

    def _exact(self):
        """Autocast off: a caller's `torch.autocast` block would otherwise make the maps in bfloat16."""
        return torch.autocast(self.device.type, enabled=False)

    def check_options(self, method: str, image_size: Sequence[int], **method_kw) -> None:
        """Refuse an unknown method, an option it lacks or a value out of range, before any map is made.

        image_size: (H, W) of the images to explain (the occlusion window must fit). The loops over
        many images and methods (localisation_scores, cascading_randomisation, the explorer) call
        this first, so a typo in the last method's settings does not wait for the others to run.
        """
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
        allowed = [p for p in inspect.signature(getattr(self, f"_{method}")).parameters
                   if p not in ("forward", "images", "args")]
        unknown = sorted(set(method_kw) - set(allowed))
        if unknown:
            raise ValueError(f"{method!r} takes no option(s) {unknown}; its options are {allowed}")
        for name in ("n_steps", "internal_batch_size", "nt_samples", "perturbations_per_eval"):
            if name in method_kw:
                _check_count(name, method_kw[name])
        if method_kw.get("seed") is not None:
            check_int("seed", method_kw["seed"], 0)
        stdev = method_kw.get("stdev", 0.15)
        check_number("stdev", stdev, 0, above=True, advice="a fraction of the image's value range, e.g. 0.15")
        window = method_kw.get("window")
        if window is not None:
            _check_count("window", window, min(image_size), " (the image side; None: 1/8 of it)")
        if method_kw.get("stride") is not None:
            most = window if window is not None else _default_window(image_size)
            _check_count("stride", method_kw["stride"], most, " (the window; None: the window)")
        if "baseline" in method_kw:
            _check_baseline(method_kw["baseline"])
        if method_kw.get("interpolate_mode", "bilinear") not in UPSAMPLE_MODES:
            raise ValueError(f"unknown interpolate_mode {method_kw['interpolate_mode']!r}; "
                             f"expected one of {UPSAMPLE_MODES}")
        if method_kw.get("anchor", "block") not in ANCHORS:
            raise ValueError(f"unknown anchor {method_kw['anchor']!r}; expected one of {ANCHORS}")

    def _check_images(self, images: Tensor) -> Tensor:
        if not isinstance(images, Tensor):  # "add a batch axis" was no advice for a NumPy batch
            if isinstance(images, (list, tuple)) and images and all(isinstance(x, Tensor) for x in images):
                fix = "stack the images into one, torch.stack(images)"
            elif getattr(images, "dtype", None) == np.uint8:  # an 8-bit NumPy batch
                fix = "convert it with torch.as_tensor(images).float() / 255 (8-bit: 0..255 -> 0..1)"
            else:
                fix = "convert it with torch.as_tensor(images).float()"
            raise TypeError(f"images must be a (B, C, H, W) tensor, got {_kind(images)}; {fix}")
        if images.dim() != 4:
            raise ValueError(f"images must be a (B, C, H, W) tensor, got shape {tuple(images.shape)}; add a batch "
                             "axis with images[None]")
        if len(images) == 0:  # Captum's IndexError otherwise
            raise ValueError(f"images is an empty batch {tuple(images.shape)}; pass at least one image")
        check_floating(images)  # a bare .float() of uint8 would explain the model on 0..255, which it refuses
        finite = torch.isfinite(images).flatten(1).all(1)
        if not bool(finite.all()):  # the map of a NaN pixel is NaN, and silently so before any score is taken
            raise ValueError(f"images {torch.nonzero(~finite).flatten().tolist()} hold NaN or infinite values; "
                             "check the data (or the transform that made them) before explaining the model")
        return images.to(self.device, self.dtype)  # the model's own precision (float32, or float64 to check maths)

    # the methods: each returns (B, C, H, W) or (B, 1, H, W) attributions

    def _ig(self, forward, images, args, n_steps: int = 32, internal_batch_size: int = 64,
            baseline: str | float = "mean"):
        """Integrated Gradients along the straight path from a `baseline` image to the image.

        baseline "mean" (a flat image of the image's mean grey level), "black", or a grey value.
        Why not black by default: the ResFormer's patch embedding ends in LayerNorm, which ignores the
        scale of its input, so the score barely changes along the path and then jumps in the last
        sliver near the black image; the integral misses the jump and the maps stop adding up to
        score(image) - score(baseline) (IG's completeness). A flat grey image has no such singularity.
        internal_batch_size bounds how many interpolated images go through the model at once: the
        n_steps * B images of the path integral do not need to fit in GPU memory together.

        Completeness is checked (Captum's convergence delta: the maps' sum minus score(image) -
        score(baseline)) until a map is off by more than COMPLETENESS_TOLERANCE of that change; that is
        warned about, once per explainer, with the fix (more steps; the grey baseline).
        """
        from captum.attr import IntegratedGradients

        check = not self.warned_incomplete  # the delta costs two more forward passes: only while it may warn
        found = IntegratedGradients(forward).attribute(
            images, baselines=_baseline(images, baseline), additional_forward_args=args, n_steps=n_steps,
            internal_batch_size=internal_batch_size, return_convergence_delta=check)
        maps, delta = found if check else (found, None)
        if check:
            change = maps.detach().flatten(1).sum(1) - delta  # score(image) - score(baseline)
            # + 0.001: a change near 0 (a flat image; an untrained head's logit, ~0.003) is not
            # missed by a share of itself
            off = delta.abs() > COMPLETENESS_TOLERANCE * change.abs() + 1e-3
            if bool(off.any()):
                self.warned_incomplete = True
                worst = int((delta.abs() - COMPLETENESS_TOLERANCE * change.abs()).argmax())  # the furthest off
                advice = f"more steps (n_steps={n_steps} now, e.g. {4 * n_steps})"
                if not (isinstance(baseline, str) and baseline == "mean"):
                    advice += ", or the default baseline 'mean' (a flat grey image)"
                shown = torch.nonzero(off).flatten().tolist()
                warnings.warn(f"Integrated Gradients' maps of images {shown} do not add up to score(image) - "
                              f"score(baseline) (completeness): image {worst}'s map sums to "
                              f"{float(change[worst] + delta[worst]):.4g} where the score changes by "
                              f"{float(change[worst]):.4g}. The path integral is too coarse for this model; use "
                              f"{advice}", stacklevel=user_stacklevel())
        return maps

    def _saliency(self, forward, images, args):
        """Absolute input gradient."""
        from captum.attr import Saliency

        return Saliency(forward).attribute(images, additional_forward_args=args, abs=True)

    def _smoothgrad(self, forward, images, args, nt_samples: int = 8, stdev: float = 0.15, seed: int | None = None):
        """SmoothGrad (Smilkov et al. 2017): |gradient| averaged over `nt_samples` noisy copies.

        stdev is a fraction of each image's own value range (Smilkov et al. suggest 10-20 %).
        Written out rather than with Captum's NoiseTunnel, whose noise level is one number for the
        whole batch: an image's map would then depend on the other images it is explained with.
        seed: None draws the noise from torch's generator (another map at every call, unless you
        torch.manual_seed first; later draws move on with it); an int draws it from a generator of its
        own, so the same call gives the same map and torch's generator is left where it was, and every
        image gets the same noise sequence, so its map is the same alone or in any batch (a pointing
        game over a test set then does not depend on batch_size).
        """
        from captum.attr import Saliency

        value_range = (images.amax(dim=(1, 2, 3)) - images.amin(dim=(1, 2, 3))).clamp_min(1e-6)  # (B,)
        sigma = (stdev * value_range).detach().view(-1, 1, 1, 1)  # (B, 1, 1, 1): each image its own noise level
        saliency = Saliency(forward)
        like = dict(device=images.device, dtype=images.dtype)
        if seed is not None:  # one (C, H, W) draw per sample, shared by the images: none depends on its batch
            generator = torch.Generator(images.device).manual_seed(check_int("seed", seed, 0))
            draws = torch.randn((nt_samples, *images.shape[1:]), generator=generator, **like)
        total = torch.zeros_like(images)
        for k in range(nt_samples):
            noise = torch.randn(images.shape, **like) if seed is None else draws[k].expand_as(images)
            noisy = (images + sigma * noise).detach().requires_grad_(True)
            total += saliency.attribute(noisy, additional_forward_args=args, abs=True)
        return total / nt_samples

    def _gradcam(self, forward, images, args, interpolate_mode: str = "bilinear", anchor: str = "block"):
        """Grad-CAM on `self.layer`, ReLU applied (positive evidence only), upsampled to the input.

        interpolate_mode: "bilinear", "nearest" or "bicubic" (how the coarse map is resampled).
        anchor: where cell j of a stride-s layer sits in the image (see `upsample_cells`): "block"
        (the middle of its s-pixel block, as a plain resize assumes) or "corner" (pixel s*j, for
        purely convolutional encoders with padded stride-2 layers).
        """
        from captum.attr import LayerGradCam

        cam = LayerGradCam(forward, self.layer).attribute(images, additional_forward_args=args, relu_attributions=True)
        if isinstance(cam, tuple):  # a layer with several outputs: explain the first
            cam = cam[0]
        if cam.dim() != 4:
            name = self.layer_name or default_layer(self.model)
            raise ValueError(f"Grad-CAM needs a layer with (B, C, h, w) output; {name!r} gives {cam.dim()} "
                             "dimensions. Pass layer= a convolutional stage")
        # bicubic overshoots between cells (a ring below 0 around a peak): clamped, Grad-CAM's maps are >= 0
        return upsample_cells(cam, images.shape[-2:], interpolate_mode, anchor).clamp_min(0)

    def _occlusion(self, forward, images, args, window: int | None = None, stride: int | None = None,
                   baseline: str | float = "mean", perturbations_per_eval: int = 16):
        """Occlusion with square `window` patches (None: 1/8 of the image side) every `stride` pixels.

        The patch is filled with `baseline` (as for "ig": "mean", "black" or a grey value).
        Each pixel gets the mean score drop over the patches that covered it. Cost: one forward pass
        per patch, (ceil((H - window) / stride) + 1) x (the same for W) per image (the last patch of a
        row or column may hang over the edge), `perturbations_per_eval` of them batched together.
        The default stride = window (patches side by side) keeps it affordable: 8 x 8 = 64 passes for
        a square image whose side is a multiple of 8 (9 x 9 = 81 at 100 px, where the window rounds down
        to 12); more for an oblong one, as the window is 1/8 of the shorter side (48 x 80: 8 x 14 = 112).
        A stride of window / 2 gives smoother maps for about four times the cost.
        The maps come back in float32 even for a float64 model (Captum 0.9 casts them).
        """
        from captum.attr import Occlusion

        C = images.shape[1]
        window = _default_window(images.shape[-2:]) if window is None else int(window)  # checked in check_options
        stride = window if stride is None else int(stride)
        maps = Occlusion(forward).attribute(
            images, sliding_window_shapes=(C, window, window), strides=(C, stride, stride),
            baselines=_baseline(images, baseline), additional_forward_args=args,
            perturbations_per_eval=perturbations_per_eval)
        # a patch covers every channel, so each channel holds the same drop: one copy (attribute sums
        # the channels, which gave C times the drop for an RGB model)
        return maps[:, :1]


UPSAMPLE_MODES = ("bilinear", "nearest", "bicubic")
ANCHORS = ("block", "corner")


def upsample_cells(cells: Tensor, size: Sequence[int], mode: str = "bilinear", anchor: str = "block") -> Tensor:
    """(B, C, h, w) map of a layer with stride s = H / h -> (B, C, H, W), each cell placed at `anchor`.

    anchor "block": cell j is centred in the middle of its s-pixel block, s*j + (s - 1)/2, as for a
    patchify convolution (kernel = stride, no padding: the ResFormer's patch embedding and merging).
    This is a plain resize (F.interpolate with align_corners=False, as Captum's
    LayerAttribution.interpolate and most Grad-CAM code do).
    anchor "corner": cell j is centred on pixel s*j, as for a stack of 3x3 convolutions and pools
    with padding 1 and stride 2 (a ResNet's downsampling: the attention-free ResFormer, the
    disentanglement encoders). On such a layer a plain resize shifts the map by (s - 1)/2 pixels
    down and right: 7.5 at H/16, half a lesion at 64 px.
    The ResFormer's stages add both paths. Measured on notebook 05's course models, Grad-CAM on the
    H/16 stage agrees best with IG and Occlusion under "block" (correlation with Occlusion: seg head
    0.50 against 0.34 under "corner", single-task classifier 0.42 against 0.33, multi-task
    classifier 0.38 under both), hence the default. Beyond the outermost cell centres the edge
    values are repeated.
    """
    if mode not in UPSAMPLE_MODES:
        raise ValueError(f"unknown interpolate_mode {mode!r}; expected one of {UPSAMPLE_MODES}")
    if anchor not in ANCHORS:
        raise ValueError(f"unknown anchor {anchor!r}; expected one of {ANCHORS}")
    if anchor == "block":
        return nn.functional.interpolate(cells, tuple(size), mode=mode)
    (H, W), (h, w) = size, cells.shape[-2:]

    def axis(n_out: int, n_cells: int) -> Tensor:
        """Grid coordinates in -1..1 (align_corners=True: -1 and 1 are the first and last cell centres)."""
        position = torch.arange(n_out, dtype=torch.float32, device=cells.device) * n_cells / n_out  # in cells
        return (2 * position / (n_cells - 1) - 1) if n_cells > 1 else torch.zeros_like(position)

    gy, gx = torch.meshgrid(axis(H, h), axis(W, w), indexing="ij")
    grid = torch.stack((gx, gy), dim=-1).expand(cells.shape[0], H, W, 2).to(cells.dtype)
    return nn.functional.grid_sample(cells, grid, mode=mode, padding_mode="border", align_corners=True)


def _default_window(image_size: Sequence[int]) -> int:
    """Occlusion's patch side when none is given: 1/8 of the image side, at least 2 pixels."""
    return max(2, min(image_size) // 8)


def _methods_and_options(methods, method_kw) -> tuple[list[str], dict[str, Mapping]]:
    """`methods` as a list ("ig" is one method, not the methods "i" and "g") and `method_kw` as the
    {method: {option: value}} the loops over several methods take: options given flat, as
    Explainer.attribute takes them, were silently left unused."""
    methods = [methods] if isinstance(methods, str) else list(methods)
    method_kw = dict(method_kw or {})
    flat = [key for key, options in method_kw.items() if key not in METHODS or not isinstance(options, Mapping)]
    if flat:
        raise ValueError(f"method_kw maps each method to its options, e.g. {{'ig': {{'n_steps': 16}}}}, but "
                         f"{flat} {'is' if len(flat) == 1 else 'are'} not a method with a dict of options (methods: "
                         f"{METHODS})")
    return methods, method_kw


def _check_count(name: str, value, most: int | None = None, hint: str = "") -> int:
    """`value` if it is an int >= 1 (and <= `most`), else a ValueError naming the option and the range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1 or (
            most is not None and value > most):
        expected = "an int >= 1" if most is None else f"an int in 1..{most}"
        raise ValueError(f"{name} must be {expected}{hint}, got {value!r}")
    return int(value)


def _class_indices(target, batch: int) -> Tensor:
    """A cls target as a long tensor; anything but integer class indices is a TypeError saying what to pass."""
    expected = f"a class index (int), {batch} class indices or None (the predicted class)"
    if isinstance(target, str):
        raise TypeError(f"cls target must be {expected}, got the name {target!r}; pass its index, "
                        f"e.g. class_names.index({target!r})")
    try:
        indices = torch.as_tensor(target)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"cls target must be {expected}, got {target!r}") from None
    whole = not indices.is_floating_point() or bool((indices == indices.round()).all())  # labels kept as 0., 1.
    if indices.is_complex() or indices.dtype == torch.bool or not whole:
        raise TypeError(f"cls target must be {expected}, got {indices.dtype} values {indices.flatten().tolist()}; "
                        "class indices are whole numbers")
    return indices.long()


def _check_baseline(baseline) -> None:
    """A ValueError unless `baseline` is "mean", "black" or a finite grey value."""
    if isinstance(baseline, str) and baseline in ("mean", "black"):
        return
    if is_finite(baseline):
        return
    raise ValueError(f"baseline must be 'mean', 'black' or a finite grey value (e.g. 0.5), got {baseline!r}")


def _baseline(images: Tensor, baseline: str | float) -> Tensor | float:
    """The reference image of IG and Occlusion: "mean" -> (B, C, H, W) flat images, "black" -> 0."""
    _check_baseline(baseline)
    if baseline == "mean":
        return images.detach().mean(dim=(1, 2, 3), keepdim=True).expand_as(images).contiguous()
    return 0.0 if baseline == "black" else float(baseline)


def attribute(model: nn.Module, images: Tensor, head: str = "cls", target=None, method: str = "ig", *,
              layer: str | nn.Module | None = None, keys: Mapping[str, str] | None = None,
              reference: Tensor | None = None, **method_kw) -> Tensor:
    """One call: (B, C, H, W) images -> (B, 1, H, W) attribution maps of `head` by `method`.

    Builds an `Explainer` (a prepared copy of the model) each time; keep an Explainer when you
    explain many batches. See `Explainer.forward_args` for what `target` means per head.
    """
    return Explainer(model, layer=layer, keys=keys).attribute(
        images, head, target, method, reference=reference, **method_kw)


# ----------------------------------------------------------------------------------------------
# quantitative checks: does the map look where it should?


def _mass(maps: Tensor, mode: str) -> Tensor:
    if mode not in MASS_MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MASS_MODES}")
    return maps.clamp_min(0) if mode == "positive" else maps.abs()


def _check_pair(maps: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    maps, mask = torch.as_tensor(maps), torch.as_tensor(mask)  # NumPy arrays too, as localisation_scores takes
    if maps.dim() != 4 or maps.shape[1] != 1:
        raise ValueError(f"maps must be (B, 1, H, W), got {tuple(maps.shape)}")
    if not torch.isfinite(maps).all():  # a NaN pixel scored a miss, an inf one a hit, and the share NaN
        raise ValueError("maps hold NaN or inf values, which no score can rank; the method or the model overflowed "
                         "(try float32, or another method), so check the maps before scoring them")
    mask = _binary_mask(mask).to(maps.device)
    if mask.shape != maps.shape:
        raise ValueError(f"mask must have the maps' shape {tuple(maps.shape)}, got {tuple(mask.shape)}")
    return maps.float(), mask


def _binary_mask(mask: Tensor, name: str = "mask") -> Tensor:
    """`mask` as float 0/1, or a ValueError: a 0/255 PNG mask or a soft mask would weight the scores
    and give shares above 1."""
    mask = mask.float()
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError(f"{name} must hold 0 and 1 only, got values in {mask.min().item():g}..{mask.max().item():g}; "
                         "for a 0/255 image mask pass mask > 0")
    return mask


def mask_share(maps: Tensor, mask: Tensor, mode: str = "positive") -> Tensor:
    """Share of the attribution mass that lies inside `mask`, per sample.

    maps, mask: (B, 1, H, W) -> (B,) in [0, 1]; NaN where the mask is empty.
    mode "positive" counts only evidence *for* the target (negative attributions argue against it,
    and letting them cancel positive ones would hide where the model looks); "absolute" counts both.
    A map that ignores the image scores the mask's area fraction: compare with that, not with 0.
    A map with no mass at all (Grad-CAM after its ReLU, for a class the model does not see) puts
    nothing in the mask: 0, as the pointing game counts it a miss, so both scores average the same
    samples.
    """
    maps, mask = _check_pair(maps, mask)
    mass = _mass(maps, mode).flatten(1)  # (B, H*W)
    inside = (mass * mask.flatten(1)).sum(1)
    total = mass.sum(1)
    share = inside / total.clamp_min(1e-12)  # 0 for a massless map
    return share.masked_fill(mask.flatten(1).sum(1) == 0, float("nan"))


def _grow(mask: Tensor, pixels: int) -> Tensor:
    """(B, 1, H, W) mask dilated by `pixels` in every direction (a square neighbourhood)."""
    if isinstance(pixels, bool) or not isinstance(pixels, numbers.Integral) or pixels < 0:  # every caller's check
        raise ValueError(f"tolerance must be an integer >= 0 (pixels), got {pixels!r}")
    return nn.functional.max_pool2d(mask, 2 * pixels + 1, stride=1, padding=pixels) if pixels else mask


def pointing_game(maps: Tensor, mask: Tensor, tolerance: int = 1, mode: str = "positive") -> Tensor:
    """Pointing game (Zhang et al. 2016): is the map's maximum inside the mask? Per sample.

    maps, mask: (B, 1, H, W) -> (B,) 1.0 hit / 0.0 miss; NaN where the mask is empty.
    The mask is first grown by `tolerance` pixels (Zhang et al. allow 15 px at 224 px), so a peak on
    the lesion's edge still counts. Occlusion and upsampled Grad-CAM maps can have a plateau of
    equal maxima: it counts as a hit when at least half of it lies in the grown mask (for a single
    maximum that is Zhang et al.'s rule). A map with no positive mass points nowhere: a miss.
    """
    maps, mask = _check_pair(maps, mask)
    grown = _grow(mask, tolerance)
    mass = _mass(maps, mode).flatten(1)  # (B, H*W)
    peak = mass.amax(1, keepdim=True)  # (B, 1)
    top = mass >= peak * (1 - 1e-6)  # (B, H*W) the maximal pixels
    inside = (top & (grown.flatten(1) > 0)).sum(1) / top.sum(1)
    hit = (inside >= 0.5) & (peak[:, 0] > 0)
    return hit.float().masked_fill(mask.flatten(1).sum(1) == 0, float("nan"))


def localisation_scores(explainer: Explainer, images: Tensor, mask: Tensor, head: str = "cls", target=None,
                        methods: Sequence[str] = METHODS, *, tolerance: int = 1, mode: str = "positive",
                        method_kw: Mapping[str, Mapping] | None = None, batch_size: int = 16,
                        progress: bool = False, reference: Tensor | None = None) -> dict[str, dict[str, float]]:
    """In-mask share and pointing game of each method, averaged over the samples with a non-empty mask.

    images: (B, C, H, W), mask: (B, 1, H, W), the region the map should point at (lesion, artifact).
    Images are explained `batch_size` at a time (SmoothGrad and Occlusion multiply the batch that
    goes through the model by their samples or patches per pass: keep it small on a GPU).
    reference: for the recon head, what the reconstruction is scored against, (B, C, H, W) like
    `images` (the clean images, where there are any; None: the input itself, see `forward_args`).
    Returns {method: {"mask_share": ..., "pointing_game": ..., "chance": ..., "pointing_chance": ...}}:
    "chance" is the mean area fraction of the mask (the share a map blind to the image gets),
    "pointing_chance" that of the mask grown by `tolerance` (how often a peak at a random pixel hits).
    A map with no mass counts as a miss in both scores (see `mask_share`), which can put them below
    chance: e.g. the seg head with target None where the model predicts no lesion explains an empty
    region, and every method's map is 0 there; pass the masks as the target to explain the lesion itself.
    """
    methods, method_kw = _methods_and_options(methods, method_kw)
    for method in methods:  # all of them before the first map: a typo in the last must not wait for the others
        explainer.check_options(method, images.shape[-2:], **method_kw.get(method, {}))
    # per-sample targets (labels, regions), masks and references given as lists or NumPy arrays become
    # tensors, so that they too lose the rows of empty masks and are cut into the images' batches
    # (a list of 6 labels reached every batch of 4 whole: "4 class indices, got shape (6,)")
    if isinstance(target, (list, tuple, np.ndarray)) and np.asarray(target).dtype.kind in "biuf":
        target = torch.as_tensor(np.asarray(target))
    if isinstance(target, Tensor) and target.numel() == 1:
        target = target.reshape(())  # [2]: one class for every sample, like the int 2
    mask = _binary_mask(torch.as_tensor(mask))  # the chance levels too: a 0/255 mask gave "chance" 9.8
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)  # (B, H, W) as `forward_args` takes regions
    expected = (images.shape[0], 1, *images.shape[-2:])
    if mask.shape != expected:  # before any map is made
        raise ValueError(f"mask must be (B, 1, H, W) like the images, {expected}, got {tuple(mask.shape)}")
    reference = None if reference is None else torch.as_tensor(reference)
    keep = mask.flatten(1).sum(1) > 0
    if not keep.any():
        raise ValueError("every mask is empty; pass images whose region (e.g. lesion) is present")
    images, mask = images[keep.to(images.device)], mask[keep]
    if reference is not None:
        if reference.shape != keep.shape + images.shape[1:]:
            raise ValueError(f"reference must have the images' shape {(len(keep), *images.shape[1:])}, "
                             f"got {tuple(reference.shape)}")
        reference = reference[keep.to(reference.device)]
    if isinstance(target, Tensor) and target.dim() >= 1:
        if target.shape[0] != len(keep):  # else each batch got a slice that fitted another batch
            raise ValueError(f"a per-sample target needs one row per image ({len(keep)}), got shape "
                             f"{tuple(target.shape)}; pass one per image, or one class index (int) for all")
        target = target[keep.to(target.device)]
    chance = float(mask.flatten(1).mean(1).mean())
    grown = _grow(mask, tolerance)
    pointing_chance = float(grown.flatten(1).mean(1).mean())
    scores = {}
    for method in tqdm(methods, desc="attribution", disable=not progress, leave=False):
        maps = torch.cat([
            explainer.attribute(images[i:i + batch_size], head, _rows(target, i, batch_size), method,
                                reference=_rows(reference, i, batch_size), **method_kw.get(method, {})).cpu()
            for i in range(0, len(images), batch_size)])
        if not torch.isfinite(maps).all():  # named here, with its method, rather than by the scores below
            raise ValueError(f"{method}'s maps hold NaN or inf values (the model or the method overflowed); "
                             "try float32 or another method, and check the model's outputs on these images")
        scores[method] = {
            "mask_share": _nanmean(mask_share(maps, mask.cpu(), mode)),
            "pointing_game": _nanmean(pointing_game(maps, mask.cpu(), tolerance, mode)),
            "chance": chance,
            "pointing_chance": pointing_chance,
        }
    return scores


def _rows(target, start: int, size: int):
    """Rows start:start+size of a per-sample target; an int or None applies to every sample."""
    return target[start:start + size] if isinstance(target, Tensor) and target.dim() >= 1 else target


def _nanmean(values: Tensor) -> float:
    """Mean over the defined (non-NaN) values; NaN when none is defined."""
    defined = values[~values.isnan()]
    return float(defined.mean()) if defined.numel() else float("nan")


# ----------------------------------------------------------------------------------------------
# sanity check: cascading parameter randomisation (Adebayo et al. 2018)


def spearman(a: Tensor, b: Tensor, absolute: bool = True) -> Tensor:
    """Spearman rank correlation between two batches of maps, per sample.

    a, b: (B, ...) -> (B,). Ties get their average rank. absolute: compare |a| with |b| (Adebayo et
    al. report both; the absolute version ignores sign flips, which gradients of a re-initialised
    layer make at random). A constant map has no ranking to share: NaN if the first map is constant
    (nothing to compare against, whatever the second), else 0 if the second is.
    """
    from scipy.stats import rankdata

    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if a.shape != b.shape:  # (1, ...) against (3, ...) broadcast silently; other sizes failed deep in torch
        raise ValueError(f"a and b must be maps of the same shape, one per sample, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    a = a.detach().flatten(1).cpu().double()  # .cpu() first: MPS has no float64
    b = b.detach().flatten(1).cpu().double()
    if absolute:
        a, b = a.abs(), b.abs()
    ra = torch.from_numpy(rankdata(a.numpy(), axis=1))
    rb = torch.from_numpy(rankdata(b.numpy(), axis=1))
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    norm = ra.norm(dim=1) * rb.norm(dim=1)
    rho = (ra * rb).sum(1) / norm.clamp_min(1e-12)
    rho = rho.masked_fill(rb.norm(dim=1) == 0, 0.0)
    return rho.masked_fill(ra.norm(dim=1) == 0, float("nan")).float()


@torch.inference_mode(False)  # as Explainer.attribute: the blocks are found by their gradients
def randomisation_groups(explainer: Explainer | nn.Module, images: Tensor, head: str = "cls", target=None,
                         depth: int = 2) -> list[str]:
    """The model's blocks that `head` depends on, ordered from the output back to the input.

    A block is a module `depth` levels down the module tree (containers such as nn.ModuleList
    do not count as a level), or a shallower leaf with parameters. Only blocks whose parameters
    receive a gradient from the head's score are kept (randomising the segmentation decoder cannot
    change a classification map), and the order is the reverse of the order the forward pass first
    uses them in: "from the top", heads first, as in Adebayo et al. (2018). explainer: an Explainer,
    or the model (cascading_randomisation takes the model).
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth!r}")
    if isinstance(explainer, nn.Module):  # a bare AttributeError: 'MultiTaskUNet' has no 'model'
        explainer = Explainer(explainer)
    model = explainer.model
    groups = _blocks(model, depth)
    first_use: dict[str, int] = {}

    def record(name: str):
        def hook(_module, _inputs, _output) -> None:  # returns None: the output is left as it is
            first_use.setdefault(name, len(first_use))
        return hook

    hooks = [model.get_submodule(name).register_forward_hook(record(name)) for name in groups]
    params = {name: [p for p in model.get_submodule(name).parameters()] for name in groups}
    flat = [p for name in groups for p in params[name]]
    try:
        for p in flat:
            p.requires_grad_(True)
        images = explainer._check_images(images)
        args = explainer.forward_args(images, head, target)
        with torch.enable_grad():
            score = explainer.head(head)(images, *args).sum()
            grads = torch.autograd.grad(score, flat, allow_unused=True)
    finally:
        for hook in hooks:
            hook.remove()
        for p in flat:
            p.requires_grad_(False)
    reached = {id(p) for p, g in zip(flat, grads) if g is not None}
    used = [name for name in groups if name in first_use and any(id(p) in reached for p in params[name])]
    return sorted(used, key=lambda name: -first_use[name])


def _blocks(model: nn.Module, depth: int) -> list[str]:
    """Names of the modules `depth` levels down (containers not counted) that hold parameters."""
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    found = []

    def visit(module: nn.Module, prefix: str, level: int) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if not any(True for _ in child.parameters()):
                continue
            child_level = level if isinstance(child, containers) else level + 1
            has_own = any(True for _ in child.parameters(recurse=False))
            is_leaf = not any(True for _ in child.children())
            if not isinstance(child, containers) and (child_level >= depth or is_leaf or has_own):
                found.append(full)  # a block (own parameters are never split from their module)
            else:
                visit(child, f"{full}.", child_level)

    visit(model, "", 0)
    return found


def model_init(model: nn.Module) -> Callable[[nn.Module], None] | None:
    """The initialisation `model` applied to its modules when it was built, where this package knows it.

    mtlearn's MultiTaskUNet and ResFormerEncoder run `mtlearn.encoder.init_weights` over every module
    (Kaiming-normal convolutions, truncated-normal linear layers with std 0.02): that function.
    Anything else (MONAI networks, DisentangleNet) keeps PyTorch's per-layer defaults: None. A
    compiled (or DDP-wrapped) model is judged by the model inside.
    """
    return init_weights if isinstance(unwrapped_model(model), (MultiTaskUNet, ResFormerEncoder)) else None


def randomise_(module: nn.Module, init: Callable[[nn.Module], None] | None = None) -> None:
    """Re-initialise every parameter of `module` in place, with the scheme its model was built with.

    First every module with `reset_parameters` (conv, linear, norms) is reset to PyTorch's defaults
    (running statistics of norms too); any other parameter is redrawn from a normal distribution with
    the original's standard deviation (0.02 if it had none). Then `init`, if given, is applied to
    every submodule (`module.apply(init)`), as the model's constructor did: pass the model's own
    initialisation (`model_init(model)`, e.g. `mtlearn.encoder.init_weights`), so the weights have
    the scale of a freshly built model's, as in Adebayo et al. (2018). Why it matters: PyTorch's
    default draws a linear layer's weights with std 1 / sqrt(3 fan_in), several times the 0.02 the
    mtlearn models use, and a layer that is louder than it ever was at initialisation is a stronger
    perturbation than the test intends. init None: PyTorch's defaults only, which is what a freshly
    built module is for models that use them (MONAI, DisentangleNet).
    """
    covered = set()
    for sub in module.modules():
        if callable(getattr(sub, "reset_parameters", None)):
            sub.reset_parameters()
            covered.update(id(p) for p in sub.parameters(recurse=False))
    with torch.no_grad():
        for p in module.parameters():
            if id(p) not in covered:
                std = float(p.std()) if p.numel() > 1 and float(p.std()) > 0 else 0.02
                p.normal_(0.0, std)
        if init is not None:
            module.apply(init)


@dataclass
class RandomisationResult:
    """Maps and rank correlations along the cascade; step 0 is the trained model."""

    steps: list[str] = field(default_factory=list)  # "original", then each randomised block, top first
    spearman: list[float] = field(default_factory=list)  # mean over samples; 1.0 for "original"
    maps: list[Tensor] = field(default_factory=list, repr=False)  # (B, 1, H, W) per step (not printed: images)
    absolute: bool = True  # whether the correlations compare |maps| (see `spearman`)

    def as_dict(self) -> dict[str, float]:
        return dict(zip(self.steps, self.spearman))


@torch.inference_mode(False)  # as Explainer.attribute: a caller's inference_mode would make the target unusable
def cascading_randomisation(model: nn.Module, images: Tensor, head: str = "cls", target=None, method: str = "gradcam",
                            *, depth: int = 2, groups: Sequence[str] | None = None, absolute: bool = True,
                            seed: int = 0, init: Callable[[nn.Module], None] | str | None = "auto",
                            layer: str | nn.Module | None = None, keys: Mapping[str, str] | None = None,
                            progress: bool = True, reference: Tensor | None = None,
                            **method_kw) -> RandomisationResult:
    """Adebayo et al. (2018), "Sanity checks for saliency maps": randomise the model block by block.

    Starting from the top (the head), each step re-initialises one more block of a copy of the
    model (cumulative) and recomputes the maps. A method that explains the *model* must change its
    maps as the weights are destroyed: the Spearman correlation with the original maps should fall.
    A method whose maps survive randomisation behaves like an edge detector of the input.

    The target (class or region) is fixed from the trained model, so every step explains the same
    quantity. groups: the block names to randomise, in order (None: `randomisation_groups`).
    init: how a block is re-initialised (see `randomise_`): "auto" the model's own scheme
    (`model_init`), a function applied to every submodule, or None for PyTorch's defaults.
    The caller's random state is left untouched. `seed` fixes the re-initialisation, and every map
    of a noisy method (SmoothGrad) is drawn with the same noise, so the curve measures the weights,
    not the noise. reference: for the recon head, what the reconstruction is scored against (the
    clean images; None: the input itself).
    """
    explainer = Explainer(model, layer=layer, keys=keys)  # a copy: `model` itself is never changed
    if init == "auto":
        init = model_init(model)
    elif init is not None and not callable(init):
        raise ValueError(f"init must be 'auto', None or a function of a module, got {init!r}")
    images = explainer._check_images(images)
    explainer.check_options(method, images.shape[-2:], **method_kw)
    target = explainer.forward_args(images, head, target, reference)[0]
    groups = list(groups) if groups is not None else randomisation_groups(explainer, images, head, target, depth)
    for name in groups:  # now, not after the original map (slow for occlusion or SmoothGrad)
        try:
            explainer.model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"groups names {name!r}, which the model does not have; pick from "
                             "randomisation_groups(...) or model.named_modules()") from None
    # Noise and new weights are drawn on the CPU and on the parameters' device: fork (save and restore)
    # exactly those generators, and seed only those (torch.manual_seed would seed every accelerator).
    device = explainer.device
    accelerator = device.type in ("cuda", "mps")
    forked = dict(devices=[device], device_type=device.type) if accelerator else dict(devices=[])

    def explain() -> Tensor:
        _seed_forked(device, seed)  # the same noise for every map (SmoothGrad); no effect on the others
        return explainer.attribute(images, head, target, method, reference=reference, **method_kw).cpu()

    with torch.random.fork_rng(**forked):
        original = explain()
        explainer.warned_incomplete = True  # the randomised models' IG maps: their completeness is not the question
        result = RandomisationResult(["original"], [1.0], [original], absolute=absolute)
        for k, name in enumerate(tqdm(groups, desc="randomise", disable=not progress, leave=False)):
            _seed_forked(device, seed + 1 + k)  # this block's new weights
            randomise_(explainer.model.get_submodule(name), init)
            explainer.model.requires_grad_(False)
            maps = explain()
            rho = spearman(original, maps, absolute)
            result.steps.append(name)
            result.spearman.append(_nanmean(rho))
            result.maps.append(maps)
    return result


def _seed_forked(device: torch.device, seed: int) -> None:
    """Seed the CPU generator and, for a CUDA or MPS `device`, that device's: the ones forked above."""
    torch.random.default_generator.manual_seed(seed)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.default_generators[index].manual_seed(seed)
    elif device.type == "mps":
        torch.mps.manual_seed(seed)  # MPS has one device


# ----------------------------------------------------------------------------------------------
# figures
#
# How a map is drawn (`_show_map`): the image in grey, the map on top in a colour map whose low end
# is transparent, so weak attribution leaves the image readable (a dark lesion with strong
# attribution is coloured, not left black). Signed maps (IG, Occlusion): blue below 0, red above,
# opacity growing with |value|, clear at 0. Unsigned maps: colour (purple -> yellow) and opacity
# both grow with the value.
# The colour limit is a robust maximum (`colour_limit`): the `percentile`-th percentile of the non-zero
# |values| of every panel drawn on that scale; stronger pixels are clipped (the colourbar's arrow says so).
# Panels meant to be compared share one limit and one colourbar: in `plot_attributions` every panel
# of the same method (all rows; "mtl/ig" and "shortcut/ig" alike) by default.

SHARES = ("method", "column", "panel")
OPACITY = 0.85  # of the strongest colour; a value at fraction t of the limit gets OPACITY * t ** 1.5
_NEGATIVE, _POSITIVE = (0.10, 0.35, 0.95), (0.90, 0.10, 0.05)  # blue against, red for
# what a colourbar's partly transparent colours are drawn over: mid-grey tissue, as in the panels (on
# white the faint end read pink, where the panels show it as a dark purple haze)
BAR_BACKGROUND = "0.5"


def colour_limit(maps: Sequence, percentile: float = 99.0) -> float:
    """One colour limit for maps drawn on one scale: the `percentile`-th percentile of their non-zero |values|.

    A percentile rather than the maximum: a handful of extreme pixels (common in gradient maps) would
    otherwise make the rest of the map, and every map sharing its scale, look empty. Captum's own
    `visualize_image_attr` clips in the same way (its outlier_perc=2). Zeros are left out: they say
    nothing about strength, and Grad-CAM (after its ReLU) or an all-zero map in the group would
    otherwise pull the limit down until every weak value saturates. All-zero maps: 1.
    maps: tensors or arrays of any shape, pooled; percentile: in (0, 100], 100 = the maximum.
    """
    if isinstance(percentile, bool) or not isinstance(percentile, numbers.Real) or not 0 < percentile <= 100:
        raise ValueError(f"percentile must be a number in (0, 100] (100: the maximum), got {percentile!r}")
    values = np.abs(np.concatenate([_array(m).ravel() for m in maps])) if len(maps) else np.zeros(1)
    values = values[np.isfinite(values) & (values > 0)]  # NaN / inf pixels say nothing about the scale either
    return float(np.percentile(values, percentile)) if values.size else 1.0


def _overlay_cmap(signed: bool) -> ListedColormap:
    """Colour map with a transparent low end: for signed maps transparent at the centre (0)."""
    t = np.linspace(0.0, 1.0, 256)
    if signed:
        colours = np.where((t < 0.5)[:, None], _NEGATIVE, _POSITIVE)  # (256, 3)
        strength = np.abs(2 * t - 1)  # 0 at the centre, 1 at -limit and +limit
    else:
        colours = plt.get_cmap("inferno")(0.3 + 0.65 * t)[:, :3]  # purple -> orange -> yellow, no black
        strength = t
    # opacity grows a little faster than linearly: faint noise stays clear, strong values stand out
    return ListedColormap(np.column_stack([colours, OPACITY * strength ** 1.5]))


def _is_signed(method: str, maps) -> bool:
    """Signed colours for IG / Occlusion, and for any map with negative values."""
    return _method_name(method) in SIGNED_METHODS or any(float(np.min(_image(m))) < 0 for m in maps)


def _show_map(ax, image, attribution, method: str, mask=None, limit: float | None = None,
              signed: bool | None = None, percentile: float = 99.0):
    """Draw one map over its grey `image` (None: on white); returns the map's AxesImage for a colourbar.

    limit: colour limit (None: this map's own `colour_limit`); signed: None decides from `method` and
    the values. An all-zero map is labelled "map = 0" in a corner (it would otherwise look like a plain
    image; in the middle the label covered the lesion being judged).
    """
    values = _image(attribution)
    signed = _is_signed(method, [values]) if signed is None else signed
    limit = colour_limit([values], percentile) if limit is None else limit
    if image is not None:
        _draw_image(ax, _image(image))
    lower = -limit if signed else 0.0
    shown = ax.imshow(values, cmap=_overlay_cmap(signed), vmin=lower, vmax=limit, interpolation="nearest")
    if not np.any(values):
        ax.text(0.03, 0.03, "map = 0", transform=ax.transAxes, ha="left", va="bottom", fontsize=8,
                bbox=dict(boxstyle="round", facecolor="white", alpha=0.8, linewidth=0))
    if mask is not None and float(mask.max()) > 0:  # an empty mask has no outline to draw
        # a dark halo: for a colour-blind reader lime is the yellow of the map's strongest values
        _halo(ax.contour(_image(mask), levels=[0.5], colors="lime", linewidths=0.8))
    ax.set_xticks([])
    ax.set_yticks([])
    return shown


def _halo(contours) -> None:
    """Draw a contour set's lines over a thin black stroke, so they stand out on any colour under them."""
    effect = [patheffects.withStroke(linewidth=2.2, foreground="black")]
    if isinstance(contours, Artist):  # Matplotlib >= 3.8: one artist
        contours.set_path_effects(effect)
    else:  # 3.7: one collection per level
        for collection in contours.collections:
            collection.set_path_effects(effect)


def _tick_label(value: float, _position=None) -> str:
    """A colourbar's end as two significant digits: plain from 0.01 to 100 ("0.36", "12"), whole above,
    and below always in the same exponent form ("5.7e-05", "1.1e-04"; .2g wrote "0.00011" beside "7.2e-06")."""
    rounded = float(f"{value:.2g}")  # judged after rounding: 99.5 is "100", 0.00999 is "0.01"
    if rounded == 0:
        return "0"
    if abs(rounded) >= 100:
        return f"{value:.0f}"
    return f"{rounded:g}" if abs(rounded) >= 0.01 else f"{value:.1e}"


def _colourbar(fig, shown, axes, values=None, location: str = "bottom"):
    """A colourbar for `shown` (from `_show_map`) under `axes`, with an arrow where `values` were clipped,
    its colours over the grey of BAR_BACKGROUND as the panels' are over the image."""
    lower, limit = shown.get_clim()
    clipped = values is not None and any(float(np.abs(_image(v)).max()) > limit for v in values)
    extend = ("both" if lower < 0 else "max") if clipped else "neither"
    bar = fig.colorbar(shown, ax=axes, location=location, extend=extend, shrink=0.85, aspect=16, pad=0.01)
    bar.ax.set_facecolor(BAR_BACKGROUND)
    bar.set_ticks([lower, 0.0, limit] if lower < 0 else [0.0, limit])
    bar.ax.tick_params(labelsize=8)
    for axis in (bar.ax.xaxis, bar.ax.yaxis):
        axis.set_major_formatter(_tick_label)
    bar.set_label("blue: against, red: for" if lower < 0 else "weak → strong", fontsize=8)
    return bar


def plot_attributions(images: Tensor, maps: Mapping[str, Tensor], masks: Tensor | None = None,
                      row_labels: Sequence[str] | None = None, title: str = "", region: str = "lesion",
                      share: str = "method", percentile: float = 99.0):
    """Grid: one row per image; columns: image, `region` mask, then one map per key of `maps`.

    images: (B, C, H, W), maps: {key: (B, 1, H, W)}, masks: (B, 1, H, W) outlined in green.
    A key is a method ("ig") or a model and a method ("mtl/ig", "shortcut/ig"). Signed methods
    (IG, Occlusion): red/blue = evidence for/against, clear = none; the others: brighter and more
    opaque = stronger. Scales (see `colour_limit`), each with a colourbar under its columns:
      share="method"  one scale per method, shared by all rows and by every column of that method, so
                      the same method can be compared across images and across models (default)
      share="column"  one scale per column, shared by its rows
      share="panel"   every panel on its own scale, with its own colourbar (strength not comparable)
    Different methods never share a scale: their units differ (logits, |gradient|, activations).
    """
    if share not in SHARES:
        raise ValueError(f"share must be one of {SHARES}, got {share!r}")
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[0] == 0:  # matplotlib named neither
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, C, H, W) tensor of at least one image, got {shape}")
    B = images.shape[0]
    if not isinstance(maps, Mapping):  # attribute(...)'s tensor as it comes: "tensors used as indices must be long"
        raise TypeError(f"maps must be a dict of method (or model/method) -> (B, 1, H, W) maps, got a "
                        f"{type(maps).__name__}; name it, e.g. plot_attributions(images, {{'ig': maps}})")
    keys = list(maps)
    expected = (B, 1, *images.shape[-2:])  # checked before the figure opens, so a bad call leaves none behind
    for key in keys:
        if tuple(maps[key].shape) != expected:
            raise ValueError(f"maps[{key!r}] must be (B, 1, H, W) like the images, {expected}, "
                             f"got {tuple(maps[key].shape)}")
    if masks is not None and (tuple(masks.shape[:1]) + tuple(masks.shape[-2:])) != (B, *images.shape[-2:]):
        raise ValueError(f"masks must be {expected} like the images, got {tuple(masks.shape)}")
    if row_labels is not None and len(row_labels) != B:
        raise ValueError(f"row_labels needs one label per image ({B}), got {len(row_labels)}")
    colour_limit([], percentile)  # its checks too, before the figure
    _image(images[0], "images")  # 2 channels: the figure was made, then left open by the error
    if masks is not None:
        _image(masks[0], "masks")  # one channel: (B, 2, H, W) class scores were named as "image"
    columns = 1 + (masks is not None) + len(keys)
    fig, axes = plt.subplots(B, columns, figsize=(1.9 * columns, 1.9 * B + 1.0), squeeze=False, layout="constrained")
    # one scale per group of columns: all columns of a method, each column alone, or each panel
    group = {key: _method_name(key) if share == "method" else key for key in keys}
    members = {g: [maps[k][row] for k in keys if group[k] == g for row in range(B)] for g in group.values()}
    limits = {g: colour_limit(values, percentile) for g, values in members.items()}
    signs = {g: _is_signed(g, values) for g, values in members.items()}
    col = 1 + (masks is not None)
    for row in range(B):
        _draw_image(axes[row, 0], _image(images[row]))
        if masks is not None:
            axes[row, 1].imshow(_image(masks[row]), cmap="gray", vmin=0, vmax=1)
        for ax in axes[row, :col]:
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row, 0].set_ylabel(row_labels[row] if row_labels is not None else f"image {row}", fontsize=8)
    for offset, key in enumerate(keys):
        g, column = group[key], axes[:, col + offset]
        for row, ax in enumerate(column):
            mask = masks[row] if masks is not None else None
            limit = None if share == "panel" else limits[g]
            shown = _show_map(ax, images[row], maps[key][row], key, mask, limit, signs[g], percentile)
            if share == "panel":
                _colourbar(fig, shown, ax, [maps[key][row]])
        if share != "panel":
            _colourbar(fig, shown, list(column), [maps[key][row] for row in range(B)])
    names = ["image"] + ([f"{region} mask"] if masks is not None else []) + keys
    for ax, name in zip(axes[0], names):
        ax.set_title(name, fontsize=9)
    rule = {"method": "one colour scale per method, shared by all its panels",
            "column": "one colour scale per column, shared by its rows",
            "panel": "each panel on its own colour scale"}[share]
    clip = "the largest |value|" if percentile == 100 else f"the {percentile:g}th percentile of the non-zero |values|"
    fig.supxlabel(f"{rule}; limit: {clip}", fontsize=7)
    fig.suptitle(title)
    return fig


def _method_name(key: str) -> str:
    """'ig' from keys such as 'ig' or 'mtl/ig' (figure columns may be labelled by model and method)."""
    return key.rsplit("/", 1)[-1]


def _is_score(value) -> bool:
    """A number, or a one-element tensor or array of one (not True, "0.3" or None)."""
    if isinstance(value, (Tensor, np.ndarray)):
        return value.size == 1 if isinstance(value, np.ndarray) else value.numel() == 1
    return is_number(value)


def plot_scores(rows: Sequence[Mapping], group: str = "model", chance: float | None = None, title: str = "",
                pointing_chance: float | None = None, colours: Mapping | None = None):
    """Grouped bars: one panel per score ("mask_share", "pointing_game"), methods along x, one colour per group.

    rows: dicts with "method", `group` (e.g. "model"), "mask_share" and "pointing_game", as built
    from `localisation_scores`. chance, pointing_chance: the chance levels that `localisation_scores`
    returns, drawn as dotted lines on the share and the pointing panel (their values in the panel
    titles). Each panel's y-axis runs from 0 to 1.3 x the larger of its highest bar and its chance
    line, so small shares are not squashed at the bottom of a 0-1 axis and each can be read against
    chance; every bar carries its value. One legend, under both panels, keeps the bars clear.
    colours: {group name: a Matplotlib colour}, to keep one model's colour across figures (names
    not shown are ignored); the other groups take the default cycle's colours, then tab20's, tab20b's
    and tab20c's, skipping those given: 60 groups at most.
    """
    if colours is not None and not isinstance(colours, Mapping):  # a list was matched to groups by position
        raise ValueError(f"colours must be {{group name: colour}}, e.g. {{'mtl': 'C0'}}, got {_kind(colours)}")
    if isinstance(rows, Mapping) or len(rows) == 0:
        raise ValueError("plot_scores needs a list of at least one row, one dict per (group, method) with "
                         "'method', the group key, 'mask_share' and 'pointing_game', e.g. [dict(model='mtl', "
                         "method=m, **scores[m]) for m in scores] from localisation_scores")
    for i, row in enumerate(rows):
        missing = [k for k in ("method", group, "mask_share", "pointing_game")
                   if not isinstance(row, Mapping) or k not in row]
        if missing:  # a bare KeyError 'model' otherwise
            raise ValueError(f"row {i} has no {missing}; each row needs 'method', {group!r} (the group=), "
                             "'mask_share' and 'pointing_game'")
        wrong = [k for k in ("mask_share", "pointing_game") if not _is_score(row[k])]
        if wrong:  # float(None) raised a bare TypeError; NaN (no lesion to score) is a number, drawn as no bar
            raise ValueError(f"row {i} has {', '.join(f'{k}={row[k]!r}' for k in wrong)}; scores are numbers "
                             "(NaN where there was nothing to score)")
    pairs = [(r[group], r["method"]) for r in rows]
    repeated = sorted({str(p) for p in pairs if pairs.count(p) > 1})
    if repeated:  # one bar per pair: the last row of a pair was drawn, the others dropped without a word
        raise ValueError(f"rows repeat the ({group}, method) pair(s) {repeated}; give one row per pair (average "
                         "repeated runs first)")
    methods = list(dict.fromkeys(r["method"] for r in rows))
    groups = list(dict.fromkeys(r[group] for r in rows))
    fill = _group_colours(groups, colours or {})
    width = 0.8 / len(groups)
    # up to three groups, each method gets room for its bars' values written upright (rotated 90 degrees,
    # at the size that fitted, they were barely legible); more groups than that keep a slot and turn them
    upright = len(groups) <= 3
    slot = max(0.55, 0.34 * len(groups)) if upright else 0.75  # inches per method, per panel
    fig, axes = plt.subplots(1, 2, figsize=(1.6 + 2 * slot * len(methods), 3.6), squeeze=False,
                             layout="constrained")
    for ax, score in zip(axes[0], ("mask_share", "pointing_game")):
        level = chance if score == "mask_share" else pointing_chance
        found = [float(r[score]) for r in rows if np.isfinite(float(r[score]))]
        peak = max(found + ([level] if level is not None else []), default=0.0)
        top = 1.3 * peak if peak > 0 else 1.0  # headroom for the values written on the bars
        digits = 3 if top < 0.5 else 2  # small scores need the third decimal to tell them apart
        for g, name in enumerate(groups):
            values = {r["method"]: float(r[score]) for r in rows if r[group] == name}
            xs = [m + (g - (len(groups) - 1) / 2) * width for m in range(len(methods))]
            heights = [values.get(m, float("nan")) for m in methods]
            bars = ax.bar(xs, heights, width, label=str(name), color=fill[name])
            ax.bar_label(bars, [f"{v:.{digits}f}" if np.isfinite(v) else "" for v in heights], padding=1,
                         fontsize=6.5 if upright else 6, rotation=0 if upright else 90)
        name = score.replace("_", " ")
        if level is not None:
            ax.axhline(level, color="k", ls=":", lw=1, label="chance")
            name += f" (chance {level:.3f})"
        ax.set_xticks(range(len(methods)), methods, rotation=20)
        ax.set_xlabel("method")
        ax.set_ylabel(score.replace("_", " "))
        ax.set_ylim(min(0.0, 1.3 * min(found, default=0.0)), top)
        ax.set_title(name)
        ax.grid(axis="y", alpha=0.3)
    handles = list(axes[0, 0].containers) + [ax.lines[0] for ax in axes[0] if ax.lines][:1]  # groups, then chance
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=7, frameon=False)
    fig.suptitle(title)
    return fig


def _group_colours(groups: list, colours: Mapping) -> dict:
    """A distinct colour per group: those `colours` gives, then the default cycle's and tab20(b, c)'s others."""
    given = {}
    for name in groups:
        if name in colours:
            if not is_color_like(colours[name]):  # Matplotlib's "Invalid RGBA argument" named no group
                raise ValueError(f"colours[{name!r}] = {colours[name]!r} is not a Matplotlib colour; use a name "
                                 "('tab:blue', 'red'), 'C0', or '#1f77b4'")
            given[name] = colours[name]
    seen = {}
    for name, colour in given.items():
        if (twin := seen.setdefault(to_hex(colour, keep_alpha=True), name)) != name:  # indistinguishable bars
            raise ValueError(f"colours gives {twin!r} and {name!r} the same colour ({colour!r}); give each group "
                             "shown its own")
    palette = [*plt.rcParams["axes.prop_cycle"].by_key().get("color", []),
               *(c for cmap in ("tab20", "tab20b", "tab20c") for c in plt.get_cmap(cmap).colors)]
    spare = [c for c in dict.fromkeys(to_hex(c, keep_alpha=True) for c in palette) if c not in seen]
    others = [name for name in groups if name not in given]
    if len(others) > len(spare):  # they went grey, all alike
        raise ValueError(f"{len(groups)} groups are more than plot_scores can colour apart ({len(spare) + len(given)}"
                         "); plot fewer at a time")
    return {**dict(zip(others, spare)), **given}


def plot_randomisation(result: RandomisationResult, index: int = 0, method: str = "gradcam",
                       image: Tensor | None = None, title: str = "Cascading randomisation", percentile: float = 99.0):
    """The maps of sample `index` along the cascade, each with its rank correlation to the original map.

    Each panel's title gives that image's Spearman rho (the map shown) and the mean over all the
    result's images (the curve of the first figure). Every map is on its own colour scale: the test
    compares rankings, not strengths, and a randomised model's maps can be orders of magnitude
    weaker or stronger. All-zero maps are labelled "map = 0".
    """
    n = len(result.steps)
    count = result.maps[0].shape[0]  # the spearman means skip images whose original map is constant (rho NaN)
    if isinstance(index, bool) or not isinstance(index, numbers.Integral) or not 0 <= index < count:
        raise ValueError(f"index must be an image of the result, an int in 0..{count - 1}, got {index!r}")
    size = tuple(result.maps[0].shape[-2:])
    if image is not None and tuple(image.shape[-2:]) != size:  # else the map covered a corner of the image
        raise ValueError(f"image is {tuple(image.shape[-2:])} but the maps are {size}: pass the image the maps "
                         "were computed on")
    if image is not None:
        _image(image)  # a (1, C, H, W) batch: the figure was made, then left open by the error
    original = result.maps[0][index:index + 1]
    absolute = result.absolute
    columns = min(n, 6)
    rows = -(-n // columns)  # ceil: wrap long cascades onto several rows
    fig, axes = plt.subplots(rows, columns, figsize=(1.9 * columns, 2.3 * rows + 0.5), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[n:]:
        ax.set_axis_off()
    for ax, step, rho, maps in zip(axes.flat, result.steps, result.spearman, result.maps):
        _show_map(ax, image, maps[index], method, percentile=percentile)
        own = float(spearman(original, maps[index:index + 1], absolute)[0])
        ax.set_title(f"{step}\nthis image: rho = {own:.2f}\nmean: rho = {rho:.2f}", fontsize=7)
    axes[0, 0].set_ylabel(method)
    fig.supxlabel(f"rho: Spearman rank correlation with the original map{' (of |values|)' if absolute else ''}"
                  f"; mean: over the {count} images (leaving out any whose original map is constant)"
                  f"; each map on its own colour scale", fontsize=7)
    fig.suptitle(title)
    return fig


# ----------------------------------------------------------------------------------------------
# the viewer


class AttributionExplorer(Explorer):
    """Pick an image, a head, a target and a method; the attribution overlay is redrawn.

    Like mtlearn.widgets.DatasetExplorer it builds without a browser: the figure goes into an
    Output widget and what was drawn is recorded in `.state` (index, head, target, method,
    title, the map's in-mask share and whether its peak lies in the lesion); `.figure` is the last
    figure drawn (closed after display, still readable, e.g. to save).
    tolerance: pixels by which the lesion is grown before the "peak in lesion" check (`pointing_game`);
    pass the tolerance your scores use so that the viewer agrees with them (default: that of
    `localisation_scores`, 1).

    explorer = AttributionExplorer(model, test_set); display(explorer)
    """

    ARGUMENTS = "model, "
    CACHE_SIZE = 64  # views kept (item and map): unbounded, clicking through 120 views at 128 px held 118 MiB

    def __init__(self, model: nn.Module, dataset, heads: Sequence[str] | None = None,
                 methods: Sequence[str] = METHODS, class_names: Sequence[str] | None = None,
                 layer: str | nn.Module | None = None, keys: Mapping[str, str] | None = None,
                 method_kw: Mapping[str, Mapping] | None = None, tolerance: int = 1):
        first = self._check_dataset(dataset)  # a DataLoader, a batch tensor, an empty set: said here
        if "image" not in first:
            raise ValueError(f"AttributionExplorer explains an item's 'image', but the first item has only "
                             f"{sorted(first)}; pass a dataset of dict items with an 'image'")
        methods, self.method_kw = _methods_and_options(methods, method_kw)
        unknown = [m for m in methods if m not in METHODS]
        if unknown or not methods:
            raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {list(methods)}")
        if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Integral) or tolerance < 0:
            raise ValueError(f"tolerance must be an integer >= 0 (pixels), got {tolerance!r}")
        self.dataset = dataset
        self.tolerance = tolerance
        self.explainer = Explainer(model, layer=layer, keys=keys)
        # a NumPy array of names has no truth value: `class_names or ...` raised
        names = class_names if class_names is not None else find_class_names(dataset)  # through Subsets too
        self.class_names = list(names) if names is not None else None  # the dataset's own may be an array too
        for method in methods:  # now, not when a student first picks the method in the widget
            self.explainer.check_options(method, first["image"].shape[-2:], **self.method_kw.get(method, {}))
        with torch.no_grad(), self.explainer._exact():  # one pass tells which heads there are, how many classes
            outputs = self.explainer.model(self.explainer._check_images(first["image"][None]))
        if heads is None:
            heads = [h for h in HEADS if isinstance(outputs, dict) and self.explainer.keys[h] in outputs]
            if not heads:  # e.g. a DisentangleNet, whose outputs are logits_a / logits_b
                given = sorted(outputs) if isinstance(outputs, dict) else type(outputs).__name__
                raise ValueError(f"the model has none of the outputs {dict(self.explainer.keys)} the heads read "
                                 f"(it gives {given}); say which one each head reads, e.g. keys={{'cls': 'logits_a'}} "
                                 "(and layer='encoder_a' for Grad-CAM)")
        if not heads or any(h not in HEADS for h in heads):
            raise ValueError(f"heads must be a non-empty subset of {HEADS}, got {heads}")
        self.num_classes = int(_head_output(outputs, self.explainer.keys["cls"]).shape[1]) if "cls" in heads else 0
        if "cls" in heads and self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"class_names has {len(self.class_names)} names, but the model predicts "
                             f"{self.num_classes} classes: {self.class_names}; pass one name per class")
        self.has_mask = "mask" in dataset[0]  # BreastMNIST has none: no lesion targets to offer
        self.index = widgets.IntSlider(0, 0, len(dataset) - 1, description="item", continuous_update=False)
        self.head = widgets.Dropdown(options=list(heads), description="head")
        self.target = widgets.Dropdown(options=self._targets(self.head.value), description="target")
        self.method = widgets.Dropdown(options=list(methods), description="method")
        self.output = widgets.Output()
        self.state: dict = {}
        self.figure = None
        self._cache: dict = {}
        self._redraw = True
        for control in (self.index, self.target, self.method):
            control.observe(lambda _change: self._draw_or_say(), names="value")
        self.head.observe(self._head_changed, names="value")
        self.widget = widgets.VBox([widgets.HBox([self.index, self.head]),
                                    widgets.HBox([self.target, self.method]), self.output])
        self.draw()

    def _release(self) -> None:
        super()._release()
        self.explainer, self._cache = None, {}  # the model's copy, and the views drawn with it

    def _targets(self, head: str) -> list[tuple[str, object]]:
        """(label, value) choices of the target dropdown for `head`."""
        if head == "cls":
            names = self.class_names or [str(k) for k in range(self.num_classes)]
            return [("predicted class", "predicted")] + [(name, k) for k, name in enumerate(names)]
        lesion = {"seg": [("true lesion", "mask")], "recon": [("lesion region", "mask")]}[head] if self.has_mask else []
        if head == "seg":
            return [("predicted lesion", "predicted")] + lesion
        return [("whole image", "image")] + lesion

    def _head_changed(self, _change) -> None:
        self._redraw = False  # changing the options resets the target: draw once, below
        self.target.options = self._targets(self.head.value)
        self.target.value = self.target.options[0][1]
        self._redraw = True
        self._draw_or_say()

    def _draw_or_say(self) -> None:
        """draw() for a control's change: what cannot be drawn (an item of another size than the options
        were checked on, a method that fails on it) is said where the figure would be; raised in a
        widget's callback it would go to the kernel's log, leaving the old figure up."""
        try:
            self.draw()
        except Exception as error:  # noqa: BLE001 (shown to the user, not swallowed)
            text = f"item {self.index.value} cannot be drawn: {type(error).__name__}: {error}"
            say_in(self.output, text)
            self.figure, self.state = None, {"index": self.index.value, "error": text}

    def compute(self, index: int, head: str, target, method: str) -> tuple[dict, Tensor]:
        """The item and its (1, 1, H, W) map, cached together per (index, head, target, method).

        Together: an augmented dataset returns another view of the item on every read, and the map
        must stay on the image (and mask) it was computed from. The cache keeps the CACHE_SIZE views
        seen last (a view seen again moves to the end; the one unseen longest goes first).
        """
        key = (index, head, target, method)
        if key in self._cache:
            self._cache[key] = self._cache.pop(key)  # seen again: now the newest
        else:
            while len(self._cache) >= self.CACHE_SIZE:
                del self._cache[next(iter(self._cache))]  # the view unseen longest
            item = self.dataset[index]
            image = item["image"][None]
            value = item["mask"][None] if target == "mask" else None if isinstance(target, str) else target
            reference = item["clean"][None] if head == "recon" and "clean" in item else None
            maps = self.explainer.attribute(image, head, value, method, reference=reference,
                                            **self.method_kw.get(method, {})).cpu()
            self._cache[key] = (item, maps)
        return self._cache[key]

    def draw(self) -> None:
        self._check_open()
        if not self._redraw:
            return
        index, head, target, method = self.index.value, self.head.value, self.target.value, self.method.value
        item, maps = self.compute(index, head, target, method)
        label = dict((v, k) for k, v in self._targets(head))[target]
        title = f"{item.get('id', index)}  {head}: {label}  ({method})"
        share, hit = float("nan"), float("nan")
        if "mask" in item and item["mask"].sum() > 0:
            share = float(mask_share(maps, item["mask"][None])[0])
            hit = float(pointing_game(maps, item["mask"][None], self.tolerance)[0])
            title += f"\nin-lesion share {share:.2f}, peak in lesion: {'yes' if hit == 1 else 'no'}"
        fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.8), layout="constrained")
        try:
            _draw_image(axes[0], _image(item["image"]))
            if "mask" in item and item["mask"].sum() > 0:
                axes[0].contour(_image(item["mask"]), levels=[0.5], colors="lime", linewidths=1)
            if "artifact_mask" in item and item["artifact_mask"].sum() > 0:
                axes[0].contour(_image(item["artifact_mask"]), levels=[0.5], colors="orange", linewidths=1,
                                linestyles="--")  # not by colour alone: lime and orange merge for the colour-blind
            axes[0].set_title("image (lesion: green, solid; artifact: orange, dashed)", fontsize=8)
            axes[0].set_axis_off()
            shown = _show_map(axes[1], item["image"], maps[0], method, item.get("mask"))
            _colourbar(fig, shown, axes[1], [maps[0]])  # one map: its own scale
            axes[1].set_title(method, fontsize=8)
            fig.suptitle(title, fontsize=9)
        except Exception:
            plt.close(fig)  # not left open behind the error
            raise
        show_in(self.output, fig)
        self.figure = fig
        peak = divmod(int(maps[0, 0].argmax()), maps.shape[-1])
        self.state = {"index": index, "head": head, "target": label, "method": method, "title": title,
                      "map_shape": tuple(maps.shape), "peak": peak, "mask_share": share, "pointing_game": hit}
