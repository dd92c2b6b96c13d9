"""UMS-Rep (Zamzmi, Rajaraman, Antani 2021): one representation per modality, shared by every task.

The idea: learn a modality's representation *once*, from unlabeled images, by denoising them;
then share it among the tasks of that modality (denoising, segmentation, classification) and
fine-tune them together. The paper reports up to ~9 % higher accuracy and up to ~86 % less
computation time than training one task-specific model per task, and finds that the result
depends strongly on how the shared representation is fine-tuned.

    representation, record = pretrain_representation(config, data)  # labels and masks never read
    model = build_model("tiny", tasks=("seg", "cls", "recon"), image_size=config.image_size)
    transfer_encoder(representation, model)     # start from the representation ...
    transfer_decoders(representation, model)    # ... dense tasks from its denoising decoder
    freeze_encoder(model, trainable_stages=2)   # (b) partial fine-tuning
    table = compare_strategies("course")        # every strategy, accuracy and compute
    table = compare_strategies("paper", out_dir="runs/ums", resume=True)  # survives an interruption

The strategies compared (same data, same image size, same seed):

    pretrain   the representation itself: a denoising encoder-decoder on unlabeled images
    (a) frozen   one model per task from the representation, encoder frozen, task heads trained
                 (a task's "head" here: its decoder and output layer, all that is not the encoder)
    (b) partial  one model per task, the last `partial_stages` encoder stages fine-tuned
    (c) full     one model per task, everything fine-tuned
    (d) joint    ONE model with all three heads, fine-tuned together from the representation
    (e) scratch  three single-task models trained from random weights (the usual baseline)

Compute is measured for every model trained: trainable parameters, training FLOPs (a full training
step counted by torch.utils.flop_counter, backward included), wall time, memory and images seen.
A strategy that starts from the representation is shown three ways: without the pre-training
(the representation is an asset that already exists, as an ImageNet checkpoint would be), with
all of it, and amortised over the strategies that reuse it in the comparison.

Parts, top-down: 1. denoising pairs, 2. freezing and transfer, 3. compute accounting,
4. the configuration and its profiles, 5. training and comparing the strategies.

Reference: G. Zamzmi, S. Rajaraman, S. Antani, "UMS-Rep: Unified modality-specific representation
for efficient medical image analysis", Informatics in Medicine Unlocked 24 (2021) 100571,
arXiv 2006.11223. The encoder, the exact strategy list and the dataset sizes are not published in
what we could read; the choices below are ours and documented where they are made.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from mtlearn.checkpoint import (
    check_out_dir,
    check_resume_options,
    check_run_folder,
    load_checkpoint,
    out_dir_lock,
    save_checkpoint,
)
from mtlearn.losses import build_losses, check_tasks, task_losses
from mtlearn.utils import (
    check_adamw,
    check_bool,
    check_int,
    check_item_index,
    check_number,
    check_options,
    count_parameters,
    find_class_names,
    countable_attention,
    is_finite,
    is_int,
    pick_device,
    seed_everything,
    to_jsonable,
    write_json,
)
from mtlearn.weighting import check_task_weights

TASKS = ("recon", "seg", "cls")  # the order of the paper: denoising, segmentation, classification
STRATEGIES = {  # name -> description; the letters (a)-(e) label them in notebook 03 and the benchmark
    "frozen": "(a) frozen encoder, task heads only",
    "partial": "(b) partial: last encoder stages fine-tuned",
    "full": "(c) full fine-tuning, one model per task",
    "joint": "(d) joint multi-task fine-tuning, one model",
    "scratch": "(e) three single-task models from scratch",
    "joint_scratch": "joint multi-task model from scratch (ablation)",
}
PRETRAINED = ("frozen", "partial", "full", "joint")  # strategies that start from the representation
DENSE_TASKS = ("recon", "seg")  # the tasks with a decoder (mtl.MultiTaskUNet): what transfer_decoders can copy
NUM_STAGES = 4  # encoder stages of the ResFormer encoder (H/2 ... H/16)


# ----------------------------------------------------------------------------------------------
# 1. denoising pairs: what the representation learns from


class DenoisingPairs(Dataset):
    """A view of a dataset as (noisy input, clean target) pairs for learning a denoiser.

    Why: UMS-Rep's representation "can be trained using unlabeled data", denoising being learned
    while constructing it. A denoiser needs a noisy input and a cleaner target, nothing else:

    - synthetic ultrasound has a speckle-free "clean" image: the input is the speckled "image"
      plus Gaussian noise of std `gaussian_std` (speckle and Gaussian noise in, clean image out);
    - a real image has no clean version: the acquired image is the target and the input is that
      image with speckle and Gaussian noise added. The speckle multiplies the echo intensity
      (Gamma-distributed, `speckle_looks` looks, mean 1, variance 1 / looks), and a B-mode image
      shows intensity log-compressed, so on the image it is added: 10 log10 of that factor, made
      zero-mean, in units of the display's 50 dB range (as `SyntheticUltrasound` draws it, and
      notebook 00 shows); black pixels, below the display's floor, get none. The model then learns
      to remove the noise we add, not the speckle already in the image: the usual self-supervised
      substitute.

    With `labels=False` (pre-training) the items hold only "image", "clean" and "id": labels and
    masks cannot leak into the representation because they are not there. With `labels=True`
    (fine-tuning on real data, whose items have no "clean") "mask" and "label" are kept too.

    `fixed_noise=True` draws the noise of item i from a generator seeded with (seed, i), so a test
    set is the same for every model; False draws new noise each time (training augmentation).

    Items: "image" (C, H, W) noisy input in [0, 1], "clean" (C, H, W) target, "id"; and "mask",
    "label" when `labels`.
    """

    def __init__(self, dataset: Dataset, gaussian_std: float = 0.02, speckle_looks: float = 4.0,
                 labels: bool = False, fixed_noise: bool = False, seed: int = 0):
        self.gaussian_std = check_number("gaussian_std", gaussian_std, 0,
                                         advice="intensity units, images in [0, 1], e.g. 0.02")
        # inf drew Gamma(inf, 0) = NaN images; no speckle is not an option
        self.speckle_looks = check_number("speckle_looks", speckle_looks, 0, above=True,
                                          advice="more looks = milder speckle, e.g. 4")
        self.dataset = dataset
        self.labels = check_bool("labels", labels)  # "no" kept them
        self.fixed_noise = check_bool("fixed_noise", fixed_noise)
        self.seed = check_int("seed", seed, 0)  # now, not NumPy's message at the first item
        self.class_names = getattr(dataset, "class_names", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __repr__(self) -> str:  # was "<mtlearn.umsrep.DenoisingPairs object at 0x...>" (in StrategyData's too)
        return (f"DenoisingPairs({len(self)} pairs from {type(self.dataset).__name__}, "
                f"gaussian_std={self.gaussian_std}, speckle_looks={self.speckle_looks}, labels={self.labels}, "
                f"fixed_noise={self.fixed_noise}, seed={self.seed})")

    def __getitem__(self, index: int) -> dict:
        index = check_item_index(index, len(self))  # -1 was NumPy's "expected non-negative integer" (fixed noise)
        item = self.dataset[index]
        if not isinstance(item, Mapping) or "image" not in item:  # else "argument of type 'int' is not iterable"
            got = f"has keys {list(item)}" if isinstance(item, Mapping) else f"is of type {type(item).__name__}"
            raise ValueError(f"DenoisingPairs needs a dataset whose items are dicts with an 'image' (C, H, W) "
                             f"tensor, e.g. mtlearn.data.load_dataset(...); item {index} {got}")
        if self.fixed_noise:
            rng = np.random.default_rng([self.seed, int(index)])
        else:  # drawn from torch's generator, so seed_everything makes a run repeatable
            rng = np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
        # one channel's noise, the same in every channel: a grey image repeated for a 3-channel model got
        # other noise in each, which a network averages away (a third of the noise's std), as grey input cannot
        shape = tuple(item["image"].shape)
        plane = (1, *shape[1:]) if len(shape) == 3 else shape  # (C, H, W); an (H, W) item keeps its own
        if "clean" in item:  # synthetic: the speckle is already in "image"
            clean, noisy = item["clean"], item["image"]
        else:  # real: the acquired image is the target; add speckle as the log-compressed display shows it
            clean = item["image"]
            speckle = torch.from_numpy(_displayed_speckle(rng, self.speckle_looks, plane))
            # black is below the display's floor (outside the scan sector, say): no echo there to speckle
            noisy = torch.where(clean > 0, clean + speckle, clean)
        noise = torch.from_numpy(rng.standard_normal(plane, dtype=np.float32)) * self.gaussian_std
        pair = {"image": (noisy + noise).clamp(0.0, 1.0), "clean": clean, "id": item.get("id", str(index))}
        if self.labels:
            pair.update({k: item[k] for k in ("mask", "label") if k in item})
        return pair


def _displayed_speckle(rng: np.random.Generator, looks: float, shape: tuple[int, ...]) -> np.ndarray:
    """Speckle of `looks` looks as it shows on a log-compressed B-mode image: (shape) float32, zero mean.

    The echo intensity is multiplied by a Gamma(looks, 1 / looks) factor (mean 1); the display shows
    10 log10 of the intensity over DYNAMIC_RANGE_DB, so the factor becomes an added 10 log10(factor),
    whose mean 10 / ln 10 * (digamma(looks) - ln looks) is taken away. Multiplying the displayed
    value instead (it is already log-compressed) left dark lesions all but noise-free (std 0.025 at
    0.05) and saturated bright tissue (std 0.25 at 0.8, a quarter clipped at 1).
    """
    from scipy.special import digamma

    from mtlearn.data.synthetic import DYNAMIC_RANGE_DB

    factor = rng.gamma(looks, 1.0 / looks, size=shape)
    decibels = 10.0 * np.log10(factor) - 10.0 / np.log(10.0) * (digamma(looks) - np.log(looks))
    return (decibels / DYNAMIC_RANGE_DB).astype(np.float32)


class InMemory(Dataset):
    """Every item of `dataset` drawn once and kept (only `keys`): training then times the model, not the data.

    keys: the items' keys to keep, each of which the items must have; None (the default): whichever of
    "image", "clean", "mask" and "label" they have (real images have no "clean").
    """

    def __init__(self, dataset: Dataset, keys: Sequence[str] | None = None):
        self.items = []
        if len(dataset):
            first = dataset[0]  # checked, then kept: drawing it again would draw other noise
            if not isinstance(first, Mapping):
                raise ValueError(f"InMemory needs a dataset whose items are dicts, e.g. {{'image': ...}}; "
                                 f"item 0 is of type {type(first).__name__}")
            if keys is None:
                keys = [k for k in ("image", "clean", "mask", "label") if k in first]
            keys = (keys,) if isinstance(keys, str) else tuple(keys)
            if not keys:  # kept empty items, {}
                raise ValueError("keys is empty; name the items' keys to keep, e.g. ('image', 'clean'), or pass None")
            # an unknown key was dropped without a word, and training then failed on the missing target
            missing = [k for k in keys if k not in first]
            if missing:
                raise ValueError(f"the dataset's items have no {missing} (they have {list(first)}); "
                                 "keep only keys they have")
            self.items = [{k: v for k, v in item.items() if k in keys}
                          for item in (first, *(dataset[i] for i in range(1, len(dataset))))]
        self.class_names = getattr(dataset, "class_names", None)

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return f"InMemory({len(self)} items, keys={list(self.items[0]) if self.items else []})"

    def __getitem__(self, index: int) -> dict:
        return self.items[check_item_index(index, len(self.items))]


# ----------------------------------------------------------------------------------------------
# 2. freezing and transfer


def _resformer_encoder(model: nn.Module, role: str = "") -> nn.Module:
    """model.encoder, a ResFormerEncoder; else a ValueError (e.g. a MONAI baseline's contracting path)."""
    encoder = getattr(model, "encoder", None)
    if encoder is None or not hasattr(encoder, "stages"):
        raise ValueError(f"{role}{type(model).__name__} has no ResFormer `encoder` with `stages`; "
                         "build it with mtlearn.build_model(...)")
    return encoder


def encoder_parts(model: nn.Module) -> list[list[nn.Module]]:
    """The encoder in NUM_STAGES + 1 groups, input side first: [[stem, patch embedding], [stage 1], ..., [stage 4]]."""
    encoder = _resformer_encoder(model)
    stem = [encoder.stem] + ([encoder.patch_embed] if encoder.patch_embed is not None else [])
    return [stem, *([stage] for stage in encoder.stages)]


def _stay_in_eval(module: nn.Module, args) -> None:
    """Forward pre-hook of an encoder part: a frozen part runs in eval mode whatever model.train() said."""
    if module._frozen:
        module.eval()


def freeze_encoder(model: nn.Module, trainable_stages: int = 0) -> nn.Module:
    """Freeze the encoder except its last `trainable_stages` stages; decoders and heads stay trainable.

    trainable_stages: 0 (frozen encoder: decoders and heads only) ... 4 (everything trainable). The input
    layers (stem and patch embedding) belong with the first stage, so 4 trains the whole encoder.

    What "frozen" means here, for a part of the encoder:
    - its parameters get requires_grad=False: no gradients, and an optimiser built with
      `build_optimizer` (or engine.fit, which does the same) does not hold them;
    - it runs in eval mode even while the model trains: BatchNorm normalises with its stored
      running statistics and does not update them, and stochastic depth / dropout are off.
      Training mode would make BN use (and update) the statistics of each fine-tuning batch, so
      a "frozen" encoder would still drift, and the features the heads learn on would differ
      from those at test time. model.train() switches every module to training mode, so a
      forward pre-hook puts each frozen part back into eval mode before it runs.
    Calling it again replaces the previous choice. Returns `model`.
    """
    if not is_int(trainable_stages) or not 0 <= trainable_stages <= NUM_STAGES:
        raise ValueError(f"trainable_stages must be an integer from 0 (frozen encoder) to {NUM_STAGES} "
                         f"(full fine-tuning), got {trainable_stages!r}")
    groups = encoder_parts(model)
    for p in model.parameters():  # start from "all trainable", then freeze
        p.requires_grad_(True)
    num_frozen = 0 if trainable_stages == NUM_STAGES else len(groups) - trainable_stages  # groups[0]: the input layers
    for index, group in enumerate(groups):
        for part in group:
            if not hasattr(part, "_frozen"):  # one hook per part, however often we freeze
                part.register_forward_pre_hook(_stay_in_eval)
            part._frozen = index < num_frozen
            if part._frozen:
                part.requires_grad_(False)
                part.eval()
            else:  # frozen by an earlier call: back to the model's mode (BatchNorm updates, dropout on)
                part.train(model.training)
    return model


def build_optimizer(model: nn.Module, lr: float = 1e-3, weight_decay: float = 3e-5,
                    betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only (requires_grad): frozen ones get no state and no decay.

    Every trainable parameter decays alike, norms and biases included (the ResFormer recipe names no
    exemption; many codebases exempt them, which matters little at 3e-5).

    Holding frozen parameters would not change them (their .grad stays None) but would still cost
    a pass over them each step, and weight decay would then be the one thing moving them in
    optimisers that apply decay without a gradient.
    """
    lr, weight_decay, betas = check_adamw(lr, weight_decay, betas)
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise ValueError("the model has no trainable parameters; unfreeze something (freeze_encoder(model, 4))")
    return torch.optim.AdamW(parameters, lr=lr, betas=betas, weight_decay=weight_decay)


def transfer_encoder(pretrained: nn.Module, model: nn.Module) -> int:
    """Copy the encoder weights (and BN statistics) of `pretrained` into `model`. Returns the tensors copied.

    Both must be built with the same encoder (preset, in_channels, image size); otherwise a
    ValueError names what differs: the first tensor, or the image or window size (which change no
    tensor's shape, but attention weights learnt on 4 x 4 windows mean something else on 8 x 8).
    """
    source = _resformer_encoder(pretrained, "the pretrained model: ").config
    target = _resformer_encoder(model, "the model: ").config
    for name in ("image_size", "window_size"):
        if getattr(source, name) != getattr(target, name):
            raise ValueError(f"the encoders differ in {name}: {getattr(source, name)} in the pretrained model, "
                             f"{getattr(target, name)} here; build both with the same {name}")
    return _copy_state(pretrained.encoder, model.encoder, "encoder")


def transfer_decoders(pretrained: nn.Module, model: nn.Module, source: str = "recon") -> list[str]:
    """Start the dense tasks of `model` from the denoiser's decoder. Returns what was copied.

    - "recon": its decoder *and* head are the denoiser's (UMS-Rep learns denoising while
      constructing the representation, so the denoising task starts where pre-training ended);
    - "seg": its UNet decoder starts from the denoising decoder (same architecture when the seg
      decoder has no DFE); only the 1x1 mask head starts from random weights.
    (That is `source="recon"`, UMS-Rep's. Another source, e.g. a model pre-trained for "seg", lends its
    decoder to every dense task alike and its head to the same task of `model` only.)
    Why the seg decoder too: a decoder that already turns encoder features back into the image
    (tissue layers, the dark lesion and its outline) is a much better start for a mask than random
    weights: in one course-profile run it lifted the joint model's Dice after 5 epochs from 0.78
    to 0.86. Decoders are copied, not shared: each task fine-tunes its own copy.
    A decoder whose layout differs from the denoiser's (e.g. dfe="three") is left as it is.
    """
    if source not in DENSE_TASKS:  # advice to pre-train "cls" or a typo would lead nowhere
        raise ValueError(f"source must be a task with a decoder, one of {DENSE_TASKS}, got {source!r}")
    if source not in getattr(pretrained, "decoders", {}):
        raise ValueError(f"the pretrained model has no {source!r} decoder to copy; "
                         f"pre-train it with tasks=({source!r},)")
    source_decoder = pretrained.decoders[source]
    pairs = [(source_decoder, decoder, f"decoders.{task}") for task, decoder in getattr(model, "decoders", {}).items()
             if decoder.state_dict().keys() == source_decoder.state_dict().keys()]
    if source in getattr(model, "heads", {}) and source in pretrained.heads:
        pairs.append((pretrained.heads[source], model.heads[source], f"heads.{source}"))
    for pair in pairs:  # all of them before copying any: a head of another shape left the decoders copied
        _check_same_layout(*pair)
    for source_part, target_part, where in pairs:
        _copy_state(source_part, target_part, where)
    return [where for _, _, where in pairs]


def _check_same_layout(source: nn.Module, target: nn.Module, where: str) -> None:
    """A ValueError naming the first tensor of `source` that `target` lacks or holds in another shape."""
    source_state, target_state = source.state_dict(), target.state_dict()
    if source_state.keys() != target_state.keys():
        missing = sorted(set(source_state) ^ set(target_state))[:3]
        raise ValueError(f"the {where} of the two models differ (e.g. {missing}); build both with the same "
                         "preset, in_channels and image_size")
    same = "preset, in_channels and seg_classes" if where.startswith("heads.") else "preset and in_channels"
    for key, value in source_state.items():
        if value.shape != target_state[key].shape:
            raise ValueError(f"{where}.{key} has shape {tuple(value.shape)} in the pretrained model but "
                             f"{tuple(target_state[key].shape)} here; build both with the same {same}")


def _copy_state(source: nn.Module, target: nn.Module, where: str) -> int:
    _check_same_layout(source, target, where)
    target.load_state_dict(source.state_dict())
    return len(source.state_dict())


# ----------------------------------------------------------------------------------------------
# 3. compute accounting


@dataclass
class StepCost:
    """What one training step costs, measured on a batch (see `measure_training_step`)."""

    batch_size: int  # images in the measured batch
    flops: int  # forward + backward FLOPs of the step (multiply-add = 2)
    activation_bytes: int  # tensors autograd kept for the backward pass (not parameters)
    parameter_bytes: int  # parameters and buffers
    trainable_bytes: int  # trainable parameters: each also needs a gradient and two AdamW moments
    fixed_saved_bytes: int = 0  # the part of activation_bytes that does not grow with the batch
    # (under autocast: the half-precision copies of the weights that backward needs)

    @property
    def flops_per_image(self) -> float:
        return self.flops / self.batch_size

    def memory_bytes(self, batch_size: int | None = None) -> float:
        """Training memory estimate at `batch_size` (default: the measured one): weights + gradients
        + AdamW's two moments + saved tensors (the activations grow with the batch, the rest does not).

        An estimate for comparing strategies, not a bound: the temporaries of backward, the allocator's
        caching and fragmentation, the data and the framework itself are not in it, and backward frees the
        saved tensors as it goes, so a process's peak can be higher or lower. On a CPU it came close: a step
        of the paper preset (seg + cls, DFE off) at 224 px, batch 8, estimated at 3.3 GiB (3.2 without the
        weights), raised the peak resident memory of a process that already held the weights by 3.1 GiB
        (2026-12-07).
        """
        batch_size = self.batch_size if batch_size is None else check_int("batch_size", batch_size, 1)
        per_image = (self.activation_bytes - self.fixed_saved_bytes) / self.batch_size
        return self.parameter_bytes + 3 * self.trainable_bytes + self.fixed_saved_bytes + per_image * batch_size


def measure_training_step(model: nn.Module, batch: Mapping[str, Tensor], tasks: Sequence[str],
                          amp_dtype: torch.dtype | None = None) -> StepCost:
    """Count one training step of `model` on `batch`: FLOPs of forward + backward, and saved activations.

    Measured on a copy (the model itself is not touched), in training mode, with the task losses
    summed. torch.utils.flop_counter counts matrix multiplications and convolutions, forward and
    backward, at 2 FLOPs per multiply-add (attention in its math form, see
    mtlearn.utils.countable_attention, so its matrix products count as well); element-wise work
    (norms, activations, the optimiser update) is left out: a few percent. Frozen parts need no
    weight gradients and, below the lowest trainable layer, no input gradients either: the count
    shows that saving directly, which "3 x forward FLOPs" would not.

    Memory: the tensors autograd saves for backward are summed through saved_tensors_hooks
    (each storage once; parameters excluded), in a pass of its own with the attention kernel
    training uses (the math form counted for FLOPs saves more). It does not depend on the allocator, so strategies
    can be compared on a CPU, where no allocator reports a peak for torch's tensors alone. With
    4 or more images (an even number) the step is also run on the first half of the batch: what
    did not double with the batch does not grow with it (fixed_saved_bytes), so memory_bytes
    extrapolates only the rest (with fewer images everything is taken to grow).
    amp_dtype: run the step under autocast with this dtype, as engine.fit trains with mixed
    precision (resolve_amp): half-precision activations take less memory, but autocast also saves
    a half-precision copy of each weight, once per step whatever the batch.
    """
    from torch.utils.flop_counter import FlopCounterMode

    tasks = check_tasks(tasks)
    probe = copy.deepcopy(model).train()
    device = next(probe.parameters()).device
    batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
    loss_fns = build_losses(tasks).to(device)
    parameter_storages = {p.untyped_storage().data_ptr() for p in probe.parameters()}

    def step(batch: Mapping) -> int:
        """One forward + backward; returns the bytes autograd saved for the backward pass."""
        saved: dict[int, int] = {}  # storage address -> bytes

        def pack(tensor: Tensor) -> Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in parameter_storages:
                saved[storage.data_ptr()] = storage.nbytes()
            return tensor

        autocast = torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with autocast:  # the precision training runs in (engine.fit autocasts the same way)
                outputs = probe(batch["image"])
                losses = task_losses(outputs, batch, loss_fns)
            total = sum(losses.values())
            if total.requires_grad:
                total.backward()
        return sum(saved.values())

    with countable_attention(), FlopCounterMode(display=False) as counter:
        step(batch)  # FLOPs only: the math form of attention saves more for backward than training's kernel
    saved = step(batch)  # both memory passes with the attention kernel training uses
    size, fixed = len(batch["image"]), 0
    if size >= 4 and size % 2 == 0:  # other images, not the same ones twice: some saved sizes follow the data
        half = step({k: v[: size // 2] for k, v in batch.items()})
        fixed = min(max(2 * half - saved, 0), saved)  # what did not double with the batch
    parameter_bytes = sum(t.numel() * t.element_size() for t in (*probe.parameters(), *probe.buffers()))
    trainable_bytes = sum(p.numel() * p.element_size() for p in probe.parameters() if p.requires_grad)
    return StepCost(size, int(counter.get_total_flops()), saved, parameter_bytes, trainable_bytes, fixed)


@dataclass
class TrainedModel:
    """One network trained by a strategy: what it scored and what it cost."""

    strategy: str  # "frozen", "partial", "full", "joint", "scratch", "pretrain", ...
    tasks: tuple[str, ...]  # the heads trained
    metrics: dict[str, float]  # test metrics, "seg/dice", "cls/acc", ... (engine.evaluate)
    trainable_parameters: int  # parameters with requires_grad during training
    flops_per_image: float  # training FLOPs per image (forward + backward, measured)
    images_seen: int  # training images processed (epochs x dataset size)
    wall_time_s: float  # training wall time (fit: data loading and, with out_dir, checkpoint writes included)
    cpu_time_s: float  # CPU time of this process during training, all threads (less sensitive to other jobs)
    memory_mib: float  # training memory estimate (StepCost.memory_bytes) for one batch, in MiB (2**20 bytes)
    cuda_peak_mib: float = float("nan")  # torch.cuda.max_memory_allocated in training (MiB), this model's weights
    # included, other models on the GPU not (CUDA only)
    resumed_epochs: int = 0  # epochs trained before an interruption, then resumed (see train_and_measure)
    history: list[dict] = field(default_factory=list)  # engine History records, one per epoch
    model: nn.Module | None = field(default=None, repr=False)  # the trained network, in eval mode

    @property
    def memory_mb(self) -> float:
        """The old name of memory_mib (MiB all along); it warns, and goes in a later version."""
        warnings.warn("TrainedModel.memory_mb is now memory_mib (the value was always MiB, 2**20 bytes)",
                      FutureWarning, stacklevel=2)
        return self.memory_mib

    @property
    def cuda_peak_mb(self) -> float:
        """The old name of cuda_peak_mib (MiB all along); it warns, and goes in a later version."""
        warnings.warn("TrainedModel.cuda_peak_mb is now cuda_peak_mib (the value was always MiB, 2**20 bytes)",
                      FutureWarning, stacklevel=2)
        return self.cuda_peak_mib

    @property
    def train_flops(self) -> float:
        return self.flops_per_image * self.images_seen


# ----------------------------------------------------------------------------------------------
# 4. configuration and profiles


# resized copies of BUSI's images (SPEC.md section 4), none of them split as load_dataset splits BUSI
MADE_FROM_BUSI = ("busi_npz", "breastmnist")


@dataclass
class UMSRepConfig:
    """Everything one comparison needs; PROFILES holds the three course settings."""

    profile: str = "course"  # name of the profile these settings came from, for the record: setting it here applies
    # none of that profile's settings, strategy_config(profile) does
    dataset: str = "synthetic"  # "synthetic", or "busi" (fine-tune on BUSI, representation from BUS-BRA + BUS-UCLM)
    data_root: str | None = None  # folder holding the real datasets (None: data_fetch's default)
    unlabeled_datasets: tuple[str, ...] = ("bus_bra", "bus_uclm")  # real data only: the representation's images
    # (a single name, "busi", counts as ("busi",); so does a single strategy name)
    preset: str = "tiny"  # model size (mtlearn.mtl.PRESETS)
    image_size: int = 64  # training and test size, pixels (a multiple of 16)
    num_unlabeled: int | None = 600  # synthetic: the representation's images (None: 2 x num_train; real data: all)
    num_train: int | None = 300  # labelled images, fine-tuning and baselines (None: the train split, synthetic 2000;
    # a real split is subsampled at random with `seed`, at most its size)
    num_test: int | None = 300  # test images (None: the test split, synthetic 400; real data as num_train)
    batch_size: int = 16  # images per step, every strategy
    lr: float = 1e-3  # AdamW peak learning rate, polynomial decay to 0 over each run (engine.fit)
    weight_decay: float = 3e-5  # AdamW weight decay (ResFormer)
    gaussian_std: float = 0.02  # Gaussian noise added to the pre-training inputs (intensity units)
    speckle_looks: float = 4.0  # real data: speckle added to every task's input (DenoisingPairs; more: milder)
    pretrain_epochs: int = 5  # epochs of the denoising pre-training
    finetune_epochs: int = 4  # epochs of each single-task fine-tuning, (a) (b) (c)
    joint_epochs: int = 8  # epochs of the joint multi-task fine-tuning, (d)
    scratch_epochs: int = 12  # epochs of each single-task model from scratch, (e)
    partial_stages: int = 2  # (b): encoder stages fine-tuned, counted from the deepest
    joint_stages: int = 4  # (d): encoder stages fine-tuned (4: all)
    joint_task_weights: dict[str, float] | None = None  # (d) loss weights (None: seg 1, cls 0.25, recon 1, as engine)
    strategies: tuple[str, ...] = ("frozen", "partial", "full", "joint", "scratch")  # which to run, in this order
    seed: int = 0  # seeds data order and weight initialisation: identical for every strategy (each network's
    # build reseeds Python's, NumPy's and torch's global generators with it: seed_everything)
    device: str = "auto"  # "auto", "cpu", "cuda", ...
    amp: str | bool = "auto"  # mixed precision (engine.fit): bf16/fp16 on CUDA, off on the CPU; True/False as fit
    progress: bool = True  # tqdm bars
    max_compute_share: float = 0.35  # acceptance: (d) may use at most this share of (e)'s compute
    tolerance: dict[str, float] = field(default_factory=lambda: {  # acceptance: allowed drop below (e)
        "recon/psnr": 0.5, "recon/ssim": 0.02, "seg/dice": 0.02, "cls/acc": 0.02, "cls/auc": 0.02})

    def __post_init__(self):
        if isinstance(self.amp, np.bool_):  # a NumPy bool, as check_bool takes one; resolve_amp asks `is True`
            self.amp = bool(self.amp)
        # one name is a one-element tuple ("busi" is one dataset, not four letters), as build_model's tasks
        self.strategies = _names("strategies", self.strategies, "('frozen', 'joint')")
        self.unlabeled_datasets = _names("unlabeled_datasets", self.unlabeled_datasets, "('synthetic',)")
        names = self.unlabeled_datasets
        if not names or len(set(names)) != len(names):  # () failed inside torch; a repeat doubled the images
            raise ValueError(f"unlabeled_datasets must name one or more datasets, each once, got {names}")
        copies = [name for name in names if name in MADE_FROM_BUSI]
        if self.dataset == "busi" and copies:  # "busi" itself gives its train split only; these hold all of it
            raise ValueError(f"unlabeled_datasets {copies} are made from BUSI's own images, its test images included, "
                             f"which the representation would then have seen before the tasks are scored on them; "
                             f"leave them out (BUSI's train split may be listed as 'busi')")
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown or not self.strategies:
            problem = f"unknown strategies {unknown}" if unknown else "strategies is empty: name at least one"
            raise ValueError(f"{problem}; choose from {tuple(STRATEGIES)}")
        self._check_choices()
        size = self.image_size
        if not is_int(size) or size % 16 or size < 32:
            raise ValueError(f"image_size must be an integer multiple of 16, at least 32, got {size!r}")
        for name in ("pretrain_epochs", "finetune_epochs", "joint_epochs", "scratch_epochs", "batch_size"):
            check_int(name, getattr(self, name), 1)
        if len(set(self.strategies)) != len(self.strategies):
            raise ValueError(f"strategies must not repeat (a repeated one would count its compute twice), got "
                             f"{self.strategies}")
        for name in ("partial_stages", "joint_stages"):
            value = getattr(self, name)
            if not is_int(value) or not 0 <= value <= NUM_STAGES:
                raise ValueError(f"{name} must be an integer in 0..{NUM_STAGES}, got {value!r}")
        _check_acceptance(self.max_compute_share, self.tolerance)
        # checked here, not when (d) starts: by then the representation and (a)-(c) have trained
        if self.joint_task_weights is not None:
            check_task_weights(self.joint_task_weights, TASKS, "joint_task_weights (or None)")
        for name in ("num_unlabeled", "num_train", "num_test"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < 2):
                raise ValueError(f"{name} must be None (all) or an integer >= 2, got {value!r}")

    def _check_choices(self) -> None:
        """Names and numbers that would otherwise fail only after the data is loaded (BUSI: every image read)."""
        from mtlearn.engine import AMP_CHOICES, TrainConfig
        from mtlearn.mtl import PRESETS

        for name, value, choices in (("dataset", self.dataset, ("synthetic", "busi")),
                                     ("preset", self.preset, tuple(PRESETS))):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        if not (isinstance(self.amp, bool) or self.amp in AMP_CHOICES):  # True/False too, as fit takes them
            raise ValueError(f"amp must be one of {AMP_CHOICES} (or True/False), got {self.amp!r}")
        check_adamw(self.lr, self.weight_decay, TrainConfig.betas)  # fit's check (its betas), before any data loads
        check_number("gaussian_std", self.gaussian_std, 0, advice="intensity units, e.g. 0.02")
        check_number("speckle_looks", self.speckle_looks, 0, above=True, advice="more looks = milder speckle, e.g. 4")
        check_int("seed", self.seed, 0)
        check_bool("progress", self.progress)
        if self.device != "auto":  # the form here; whether this machine has it, when a step starts (_checked_config)
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                raise ValueError(f"device must be 'auto' or a torch device such as 'cpu' or 'cuda', "
                                 f"got {self.device!r}") from None


PROFILES: dict[str, dict] = {
    # CI: every strategy runs through once on a handful of 32 px images (seconds).
    "smoke": dict(preset="tiny", image_size=32, num_unlabeled=32, num_train=32, num_test=32, batch_size=16,
                  pretrain_epochs=1, finetune_epochs=1, joint_epochs=1, scratch_epochs=1),
    # The numbers the course discusses (the defaults above): about 5 minutes on 2 CPU cores with one
    # thread. Why these epochs: single-task models from scratch are near their plateau after 12 at
    # this size (the notebook shows their curves); (d) gets 8, chosen because with one encoder for
    # three heads that is about a third of (e)'s training FLOPs, inside the 35 % budget of the check.
    "course": dict(),
    # GPU, paper scale: Bui et al.'s ResFormer at 224 px, their batch size and lr, long schedules;
    # every split whole (synthetic: 2,000 labelled and 4,000 unlabeled images).
    "paper": dict(preset="paper", image_size=224, num_unlabeled=None, num_train=None, num_test=None,
                  batch_size=8, lr=1e-4, pretrain_epochs=50, finetune_epochs=30, joint_epochs=40, scratch_epochs=100),
}


def strategy_config(profile: str = "course", **overrides) -> UMSRepConfig:
    """The settings of `profile` ("smoke", "course", "paper"), with any field replaced by `overrides`."""
    if not isinstance(profile, str) or profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; expected one of {tuple(PROFILES)}")
    check_options(UMSRepConfig, overrides)
    return UMSRepConfig(**{"profile": profile, **PROFILES[profile], **overrides})


def _checked_config(config: UMSRepConfig | str) -> UMSRepConfig:
    """`config` as a UMSRepConfig checked now: a profile name becomes its settings, and a config is built again, so
    a field changed after it was made (config.batch_size = 0) is refused here, not by torch once the data loaded."""
    if isinstance(config, str):
        return strategy_config(config)
    if not isinstance(config, UMSRepConfig):
        raise ValueError(f"config must be a profile name {tuple(PROFILES)} or a UMSRepConfig (strategy_config(...)), "
                         f"got {config!r}")
    config = replace(config)
    pick_device(config.device)  # the trainer's check ('xpu', 'cpu:3', 'cuda' without a GPU), before any data loads
    return config


# ----------------------------------------------------------------------------------------------
# 5. training and comparing the strategies


@dataclass
class StrategyData:
    """The three sets every strategy uses: unlabeled pairs, labelled training images, test images."""

    unlabeled: Dataset  # DenoisingPairs without labels: the representation's data
    train: Dataset  # items with "image", "clean", "mask", "label"
    test: Dataset  # same keys; noise fixed per item on real data
    class_names: tuple[str, ...]
    in_channels: int = 1


def load_strategy_data(config: UMSRepConfig | str) -> StrategyData:
    """The data of a comparison (see UMSRepConfig.dataset); held in memory once drawn. config: a UMSRepConfig
    or a profile name, as for every step of a comparison.

    Synthetic: one deterministic stream, so the unlabeled images (items num_train onwards of the
    train split) never overlap the labelled ones (the first num_train) or the test split.
    Real: the representation learns from every image of `unlabeled_datasets` (their labels and
    masks are dropped; BUSI, if listed, gives its train split only), and the tasks are fine-tuned
    and tested on BUSI's train and test splits.
    A real image has no clean version, so it becomes the denoising target and the input is that
    image with speckle and Gaussian noise added: the input of *every* task, since one batch feeds all
    (like the synthetic "image", which carries its speckle too). The BUSI Dice and accuracy are
    therefore measured on noise-added images (fixed noise on the test split), for every strategy alike.
    """
    from mtlearn.data import load_dataset
    from mtlearn.data.real import SYNTHETIC_SIZES, dataset_folder
    from mtlearn.data.splits import random_subset

    config = _checked_config(config)
    size, seed = config.image_size, config.seed
    keep = ("image", "clean", "mask", "label")
    if config.dataset == "synthetic":
        num_train = config.num_train or SYNTHETIC_SIZES["train"]
        num_unlabeled = config.num_unlabeled or 2 * num_train
        pool = load_dataset("synthetic", split="train", image_size=size, seed=seed,
                            num_samples=num_train + num_unlabeled)
        test = load_dataset("synthetic", split="test", image_size=size, seed=seed,
                            num_samples=config.num_test or SYNTHETIC_SIZES["test"])
        train = torch.utils.data.Subset(pool, range(num_train))
        unlabeled = torch.utils.data.Subset(pool, range(num_train, num_train + num_unlabeled))
        # drawn once and kept; the Gaussian noise of the unlabeled pairs is new every epoch
        return StrategyData(
            unlabeled=DenoisingPairs(InMemory(unlabeled, ("image", "clean")), config.gaussian_std, seed=seed),
            train=InMemory(train, keep), test=InMemory(test, keep), class_names=tuple(pool.class_names))
    if config.dataset != "busi":
        raise ValueError(f"dataset {config.dataset!r} is not supported here; use 'synthetic' or 'busi' "
                         f"(with {config.unlabeled_datasets} for the representation)")

    def root(name: str):  # data_root holds one folder per dataset; given one of them, dataset_folder says so
        return None if config.data_root is None else dataset_folder(name, config.data_root)

    # on_size_mismatch="resize": only the images are used here, so a mask of another size (BUS-UCLM
    # has a few) is no reason to drop its image
    # BUSI itself as unlabeled data: its train split only, or the representation would have seen the
    # test images its denoising (and, through the shared encoder, every task) is scored on
    parts = [load_dataset(name, root=root(name), split="train" if name == "busi" else "all", image_size=size,
                          seed=seed, on_size_mismatch="resize")
             for name in config.unlabeled_datasets]
    pool = torch.utils.data.ConcatDataset(parts)
    train = load_dataset("busi", root=root("busi"), split="train", image_size=size, seed=seed)
    test = load_dataset("busi", root=root("busi"), split="test", image_size=size, seed=seed)
    # a seeded random subset: the split is ordered by file name, so its first N would all be benign
    train, test = random_subset(train, config.num_train, seed), random_subset(test, config.num_test, seed)
    noise = dict(gaussian_std=config.gaussian_std, speckle_looks=config.speckle_looks, seed=seed)
    # real images are read and resized once, here, before any clock starts; the noise of the
    # training sets is drawn anew each epoch
    return StrategyData(
        unlabeled=DenoisingPairs(InMemory(pool, ("image",)), labels=False, **noise),
        # no "clean" in a real image until DenoisingPairs makes it the target
        train=DenoisingPairs(InMemory(train, ("image", "mask", "label")), labels=True, **noise),
        test=InMemory(DenoisingPairs(test, labels=True, fixed_noise=True, **noise), keep),
        class_names=tuple(find_class_names(test)))


def _loader(dataset: Dataset, config: UMSRepConfig, shuffle: bool) -> DataLoader:
    """The same batches in the same order for every strategy (a generator seeded with config.seed)."""
    generator = torch.Generator().manual_seed(config.seed)
    return DataLoader(dataset, batch_size=config.batch_size, shuffle=shuffle, generator=generator,
                      pin_memory=pick_device(config.device).type == "cuda")  # the chosen device, not any GPU


def _new_model(config: UMSRepConfig, tasks: Sequence[str], num_classes: int, in_channels: int) -> nn.Module:
    from mtlearn.mtl import build_model

    seed_everything(config.seed)  # same initial weights for the same architecture, whatever ran before
    return build_model(config.preset, tasks=tuple(tasks), in_channels=in_channels, num_classes=num_classes,
                       image_size=config.image_size)


def _cuda_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers that live on a GPU."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()) if t.is_cuda)


RUN_WRITES = "options.json, last.pt and result.pt"  # what train_and_measure writes in its out_dir
# TrainedModel's memory fields were named *_mb until 2026-12-07, though they held MiB (2**20 bytes)
MIB_FIELDS = {"memory_mb": "memory_mib", "cuda_peak_mb": "cuda_peak_mib"}


def train_and_measure(model: nn.Module, strategy: str, train: Dataset, test: Dataset | None, config: UMSRepConfig,
                      epochs: int, task_weights: Mapping[str, float] | None = None,
                      out_dir: str | os.PathLike | None = None, resume: bool = False) -> TrainedModel:
    """Train `model` (engine.fit) on `train` for `epochs`, measure its cost, evaluate it on `test`.

    No checkpoint selection: every run ends after its fixed number of epochs with the learning rate
    decayed to zero, and the final weights are tested (there is no validation pass to pay for).

    out_dir: this run's folder. It receives options.json (the options it was started with), fit's
    last.pt after every epoch and, once the run is trained and tested, result.pt (the TrainedModel
    without its model; load_checkpoint reads it). resume=True continues it: a finished run is loaded
    (its weights from last.pt), not retrained; an interrupted one continues with fit(resume=True).
    A folder holding a run is refused without resume, and with resume when that run was started
    with other options (those of RESUME_FREE may change).
    Time: the whole of fit, so with out_dir it includes writing last.pt after every epoch (tens of
    milliseconds per epoch for the course's model, more for the paper's with its optimiser state);
    compare strategies run the same way, all with out_dir or all without, as run_comparison does.
    Time of a resumed run: wall_time_s adds, for the epochs of the interrupted session, the training
    time fit recorded for each (History's "epoch_time"; that session's set-up, checkpoint writes and
    the epoch it was interrupted in are not counted). History records no CPU time, so cpu_time_s is
    NaN (unknown) rather than the resumed session's alone, and resumed_epochs says how many epochs
    came from the earlier session. A second run into out_dir while this one lives is refused (as fit's).
    """
    with out_dir_lock(out_dir, writes=RUN_WRITES):  # from options.json to result.pt
        return _train_and_measure(model, strategy, train, test, config, epochs, task_weights, out_dir, resume)


def _train_and_measure(model: nn.Module, strategy: str, train: Dataset, test: Dataset | None, config: UMSRepConfig,
                       epochs: int, task_weights: Mapping[str, float] | None, out_dir: str | os.PathLike | None,
                       resume: bool) -> TrainedModel:
    """train_and_measure's work, while it holds out_dir."""
    from mtlearn.engine import evaluate, fit, resolve_amp

    if len(train) == 0:  # else torch's sampler fails with "num_samples should be a positive integer"
        raise ValueError(f"strategy {strategy!r}: the training set is empty; check num_train and the dataset's "
                         "train split")
    check_run_folder(out_dir, resume, "the run's last.pt and result.pt")
    tasks = tuple(model.tasks)
    device = pick_device(config.device)
    model.to(device)
    done = 0  # epochs an interrupted earlier session trained
    if out_dir is not None:
        out_dir = Path(out_dir).expanduser()
        options = {**_run_options(config, strategy), "strategy": strategy, "tasks": list(tasks), "epochs": epochs,
                   "task_weights": to_jsonable(dict(task_weights)) if task_weights else None}
        check_out_dir(out_dir, resume, writes=RUN_WRITES, cli=False, also_kept=("result.pt",))
        if resume and (out_dir / "options.json").is_file():
            saved = json.loads((out_dir / "options.json").read_text())
            check_resume_options(out_dir / "options.json", saved, options, list(options))
        if resume and (out_dir / "result.pt").is_file():  # trained and tested in an earlier session
            load_checkpoint(out_dir / "last.pt", model)
            record = load_checkpoint(out_dir / "result.pt")["record"]
            for old, new in MIB_FIELDS.items():  # a result.pt written before the fields said their unit
                if old in record:
                    record.setdefault(new, record.pop(old))
            return TrainedModel(**record, model=model.eval())
        if resume and (out_dir / "last.pt").is_file():
            done = int(load_checkpoint(out_dir / "last.pt")["epoch"])
        write_json(options, out_dir / "options.json")
    loader = _loader(train, config, shuffle=True)
    # FLOPs and saved activations grow linearly with the batch: four images measure them per image
    # (and, with their first two, what does not grow), at a fraction of the cost of counting a whole
    # batch (the counter slows every operation down)
    sample = next(iter(DataLoader(train, batch_size=4)))
    cost = measure_training_step(model, sample, tasks, amp_dtype=resolve_amp(config.amp, device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        # earlier strategies' models still on the GPU are not this run's; this model's own weights are (they
        # are in memory_mib too), so they are not subtracted with the rest
        resident = torch.cuda.memory_allocated(device) - _cuda_bytes(model)
    started, cpu_started = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():  # interrupted after its last epoch, before result.pt: nothing left to train
        warnings.filterwarnings("ignore", message="the run in .* already has")
        history = fit(model, loader, None, tasks=tasks, epochs=epochs, lr=config.lr, weight_decay=config.weight_decay,
                      task_weights=dict(task_weights) if task_weights else None, device=str(device), amp=config.amp,
                      seed=config.seed, progress=config.progress, out_dir=out_dir, resume=resume)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall_time, cpu_time = time.perf_counter() - started, time.process_time() - cpu_started
    if done:  # the interrupted session's epochs count with the training time fit recorded for each
        wall_time += sum(record["epoch_time"] for record in history.records[:done])
        cpu_time = float("nan")  # not recorded per epoch: unknown, not the resumed session's share alone
    cuda_peak = (torch.cuda.max_memory_allocated(device) - resident) / 2**20 if device.type == "cuda" else float("nan")
    metrics = {}
    if test is not None:
        metrics = evaluate(model, _loader(test, config, shuffle=False), tasks, amp=config.amp)
    record = TrainedModel(
        strategy=strategy, tasks=tasks, metrics={k: v for k, v in metrics.items() if not k.endswith("loss")},
        trainable_parameters=count_parameters(model, trainable_only=True), flops_per_image=cost.flops_per_image,
        images_seen=epochs * len(train), wall_time_s=wall_time, cpu_time_s=cpu_time,
        memory_mib=cost.memory_bytes(config.batch_size) / 2**20,
        cuda_peak_mib=cuda_peak, resumed_epochs=done, history=list(history.records), model=model.eval())
    if out_dir is not None:  # plain values only (NumPy scalars become floats), so that weights_only reads it
        saved = {f.name: getattr(record, f.name) for f in fields(record) if f.name != "model"}
        saved["metrics"] = {k: float(v) for k, v in record.metrics.items()}
        save_checkpoint({"record": saved}, out_dir / "result.pt")
    return record


# what a resumed comparison may change: where and how fast it runs, which strategies, the acceptance
# thresholds and the profile's name (as fit, which lets a resumed run change device and precision)
RESUME_FREE = ("profile", "data_root", "device", "amp", "progress", "strategies", "max_compute_share", "tolerance")


# options that shape some runs only: each run records its own epochs and task weights, and the stages of (b)
# and (d) shape those strategies alone; so changing scratch_epochs leaves the finished pre-training resumable
ONLY_FOR = {"pretrain_epochs": (), "finetune_epochs": (), "joint_epochs": (), "scratch_epochs": (),
            "joint_task_weights": (), "partial_stages": ("partial",), "joint_stages": ("joint",)}


def _run_options(config: UMSRepConfig, strategy: str) -> dict:
    """The options of `config` that shape what a run of `strategy` trains and measures, as JSON values."""
    return {k: v for k, v in to_jsonable(asdict(config)).items()
            if k not in RESUME_FREE and strategy in ONLY_FOR.get(k, (strategy,))}


def _run_dir(out_dir: str | os.PathLike | None, strategy: str, tasks: Sequence[str]) -> Path | None:
    """The folder of one network of a comparison: out_dir/<strategy>/<tasks> (e.g. joint/recon+seg+cls)."""
    return None if out_dir is None else Path(out_dir).expanduser() / strategy / "+".join(tasks)


def _check_data(data: StrategyData) -> None:
    """A ValueError unless `data` is a StrategyData (None failed on "no attribute 'class_names'")."""
    if not isinstance(data, StrategyData):
        raise ValueError(f"data must be the comparison's StrategyData (load_strategy_data(config)), "
                         f"got {type(data).__name__}")


def pretrain_representation(config: UMSRepConfig | str, data: StrategyData, out_dir: str | os.PathLike | None = None,
                            resume: bool = False) -> tuple[nn.Module, TrainedModel]:
    """Learn the representation: a denoising encoder-decoder trained on `data.unlabeled` only.

    Returns the denoiser (its `.encoder` is the representation) and its TrainedModel record, whose
    metrics are its denoising scores on the test set (no fine-tuning).
    out_dir, resume: the comparison's folder (the run goes to out_dir/pretrain/recon), see run_comparison.
    """
    config = _checked_config(config)
    _check_data(data)
    check_run_folder(out_dir, resume, "the comparison's runs")
    model = _new_model(config, ("recon",), len(data.class_names), data.in_channels)
    record = train_and_measure(model, "pretrain", data.unlabeled, data.test, config, config.pretrain_epochs,
                               out_dir=_run_dir(out_dir, "pretrain", ("recon",)), resume=resume)
    return model, record


def run_strategy(strategy: str, config: UMSRepConfig | str, data: StrategyData, representation: nn.Module | None = None,
                 out_dir: str | os.PathLike | None = None, resume: bool = False) -> list[TrainedModel]:
    """Train the model(s) of one strategy and return one TrainedModel per network trained.

    out_dir, resume: the comparison's folder (each network goes to out_dir/<strategy>/<tasks>), see
    run_comparison.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {tuple(STRATEGIES)}")
    if strategy in PRETRAINED and not isinstance(representation, nn.Module):
        given = "" if representation is None else f", not a {type(representation).__name__}"
        raise ValueError(f"strategy {strategy!r} starts from the representation; pass the pretrained denoiser "
                         f"(pretrain_representation(config, data)[0]{given})")
    config = _checked_config(config)
    _check_data(data)
    check_run_folder(out_dir, resume, "the comparison's runs")
    num_classes = len(data.class_names)
    if strategy in ("joint", "joint_scratch"):
        groups, epochs = [TASKS], config.joint_epochs if strategy == "joint" else config.scratch_epochs
        stages = config.joint_stages if strategy == "joint" else NUM_STAGES
    else:
        groups = [(task,) for task in TASKS]
        epochs = {"frozen": config.finetune_epochs, "partial": config.finetune_epochs,
                  "full": config.finetune_epochs, "scratch": config.scratch_epochs}[strategy]
        stages = {"frozen": 0, "partial": config.partial_stages, "full": NUM_STAGES, "scratch": NUM_STAGES}[strategy]
    weights = config.joint_task_weights if len(groups[0]) > 1 else None
    records = []
    for tasks in groups:
        model = _new_model(config, tasks, num_classes, data.in_channels)
        if strategy in PRETRAINED:
            transfer_encoder(representation, model)
            transfer_decoders(representation, model)
        freeze_encoder(model, trainable_stages=stages)
        records.append(train_and_measure(model, strategy, data.train, data.test, config, epochs, weights,
                                         out_dir=_run_dir(out_dir, strategy, tasks), resume=resume))
    return records


@dataclass
class Comparison:
    """Everything a comparison produced: the table, every trained model's record and the denoiser."""

    table: "object"  # pandas DataFrame, one row per strategy (see `strategy_table`)
    runs: list[TrainedModel]  # one per network trained, pre-training first
    # the pretrained denoiser (None: no strategy of the comparison uses one); not in the repr, as TrainedModel's model
    representation: nn.Module | None = field(repr=False)
    config: UMSRepConfig


def run_comparison(config: UMSRepConfig | str = "course", out_dir: str | os.PathLike | None = None,
                   resume: bool = False) -> Comparison:
    """Pre-train the representation, run every strategy of `config`, and tabulate them. Without a strategy
    that starts from the representation (PRETRAINED; e.g. strategies=("scratch",)) nothing is pre-trained.

    out_dir: keep every network's run there, so that an interrupted comparison loses at most an
    epoch: one folder per network, out_dir/<strategy>/<tasks> (pretrain/recon, frozen/seg, ...,
    joint/recon+seg+cls), each with its options, fit's last.pt and, once done, result.pt (see
    train_and_measure). resume=True continues the comparison in out_dir: finished networks are
    loaded, not retrained, the interrupted one continues from its last epoch, and the metrics are
    those of an uninterrupted comparison (bit for bit on the CPU). A resumed comparison may change
    the options of RESUME_FREE (device, strategies, ...), and those of the networks it does not load or
    continue (e.g. scratch_epochs: the pre-training stays), not what they train; without resume an
    out_dir holding a comparison is refused. None (the default): nothing is written.
    """
    check_run_folder(out_dir, resume, "the comparison's runs")  # before the data are loaded
    config = _checked_config(config)
    if config.preset == "paper" and pick_device(config.device).type == "cpu":  # before weeks of work, not after
        warnings.warn(f"the paper preset at {config.image_size} px is sized for a GPU: on a CPU a comparison of its "
                      "networks (one per strategy and task) takes weeks. Run it on a GPU, or use "
                      "strategy_config('course') on this machine", stacklevel=2)
    data = load_strategy_data(config)
    representation, runs = None, []
    if any(strategy in PRETRAINED for strategy in config.strategies):  # else its compute would be spent for nothing
        representation, pretrain = pretrain_representation(config, data, out_dir, resume)
        runs.append(pretrain)
    for strategy in config.strategies:
        runs += run_strategy(strategy, config, data, representation, out_dir, resume)
    return Comparison(strategy_table(runs, config), runs, representation, config)


def compare_strategies(config: UMSRepConfig | str = "course", out_dir: str | os.PathLike | None = None,
                       resume: bool = False):
    """The strategy table of `config` (a UMSRepConfig or a profile name): one row per strategy.

    Indexed by strategy. Columns: description, models, the test metrics (recon/psnr, recon/ssim, seg/dice,
    cls/acc, cls/auc), trainable_params (summed over the strategy's models), train_gflops,
    wall_time_s and cpu_time_s (its own training), pretrain_gflops / pretrain_wall_time_s (the representation,
    for strategies that use it), total_* (own + all of the pre-training) and amortised_* (own +
    the pre-training divided among the strategies of this comparison that reuse it), memory_mib
    (largest model's training-memory estimate, MiB), cuda_peak_mib, images_seen, pretrain_images_seen and
    resumed_epochs (epochs trained before an interruption; its models' CPU times are then NaN, which
    joint_vs_single_task reports as unmeasured rather than failed).
    out_dir, resume: keep the runs there and continue an interrupted comparison (run_comparison).
    """
    return run_comparison(config, out_dir, resume).table


METRICS = ("recon/psnr", "recon/ssim", "seg/dice", "cls/acc", "cls/auc")


def _largest_measured(values) -> float:
    """The largest of the values that were measured (not NaN), NaN when none was: max() of [nan, 3.0] is nan but of
    [3.0, nan] is 3.0 (a comparison resumed on a GPU after a CPU start mixes the two)."""
    measured = [value for value in values if not math.isnan(value)]
    return max(measured) if measured else float("nan")


def strategy_table(runs: Sequence[TrainedModel], config: UMSRepConfig):
    """Group the TrainedModel records by strategy into the table described in `compare_strategies`.

    Amortising: the representation is learned once and every strategy of PRETRAINED in this
    comparison starts from it, so each is charged 1 / (number of them) of its cost. Real use
    amortises further (every later task and dataset of the modality reuses it), the "total"
    columns are the other extreme: a representation learned for this one strategy alone.
    """
    import pandas as pd

    # [] failed inside pandas ("None of ['strategy'] are in the columns"), None on "not iterable"
    if not isinstance(runs, (list, tuple)) or not runs:
        got = "none" if runs is None or isinstance(runs, (list, tuple)) else f"a {type(runs).__name__}"
        raise ValueError("strategy_table needs the runs' TrainedModel records (run_strategy's results or "
                         f"run_comparison(...).runs), got {got}")
    wrong = [type(r).__name__ for r in runs if not isinstance(r, TrainedModel)]
    if wrong:
        raise ValueError(f"strategy_table needs TrainedModel records (run_strategy's results), "
                         f"got an item of type {wrong[0]}")
    trained = [(r.strategy, tuple(r.tasks)) for r in runs]
    repeated = next((run for i, run in enumerate(trained) if run in trained[:i]), None)
    if repeated is not None:  # its metrics would be the first one's, its compute counted twice
        raise ValueError(f"the runs hold {repeated[0]!r} on {'+'.join(repeated[1])} twice; pass each trained network "
                         "once (run_strategy's records of one comparison)")
    pretrain = next((r for r in runs if r.strategy == "pretrain"), None)
    users = sorted({r.strategy for r in runs if r.strategy in PRETRAINED})
    rows = []
    for strategy in ["pretrain", *dict.fromkeys(r.strategy for r in runs if r.strategy != "pretrain")]:
        group = [r for r in runs if r.strategy == strategy]
        if not group:
            continue
        description = STRATEGIES.get(strategy, "representation: denoising on unlabeled images")
        row = {"strategy": strategy, "description": description, "models": len(group)}
        for metric in METRICS:
            values = [r.metrics[metric] for r in group if metric in r.metrics]
            row[metric] = values[0] if values else float("nan")
        flops = sum(r.train_flops for r in group)
        wall = sum(r.wall_time_s for r in group)
        cpu = sum(r.cpu_time_s for r in group)
        uses = pretrain is not None and strategy in PRETRAINED
        pre_flops = pretrain.train_flops if uses else 0.0
        pre_wall = pretrain.wall_time_s if uses else 0.0
        pre_cpu = pretrain.cpu_time_s if uses else 0.0
        share = 1 / max(len(users), 1)
        row.update({
            "trainable_params": sum(r.trainable_parameters for r in group),
            "train_gflops": flops / 1e9,
            "pretrain_gflops": pre_flops / 1e9,
            "total_gflops": (flops + pre_flops) / 1e9,
            "amortised_gflops": (flops + share * pre_flops) / 1e9,
            "wall_time_s": wall,
            "pretrain_wall_time_s": pre_wall,
            "total_wall_time_s": wall + pre_wall,
            "amortised_wall_time_s": wall + share * pre_wall,
            "cpu_time_s": cpu,
            "total_cpu_time_s": cpu + pre_cpu,
            "amortised_cpu_time_s": cpu + share * pre_cpu,
            "memory_mib": max(r.memory_mib for r in group),
            "cuda_peak_mib": _largest_measured(r.cuda_peak_mib for r in group),
            "images_seen": sum(r.images_seen for r in group),
            "pretrain_images_seen": pretrain.images_seen if uses else 0,
            "resumed_epochs": sum(r.resumed_epochs for r in group),
        })
        rows.append(row)
    return pd.DataFrame(rows).set_index("strategy")


def _names(option: str, value, example: str) -> tuple[str, ...]:
    """A name or a sequence of names as a tuple of str; else a ValueError (None: "not iterable")."""
    names = (value,) if isinstance(value, str) else value
    if not isinstance(names, (tuple, list)) or not all(isinstance(name, str) for name in names):
        raise ValueError(f"{option} must be a name or a tuple of names, e.g. {example}; got {value!r}")
    return tuple(names)


def _check_acceptance(max_compute_share: float, tolerance: Mapping[str, float]) -> None:
    """The acceptance options UMSRepConfig and joint_vs_single_task share, checked in one place."""
    check_number("max_compute_share", max_compute_share, 0, 1, above=True, advice="a fraction: 0.35 for 35 %")
    if not isinstance(tolerance, Mapping):
        raise ValueError(f"tolerance must map metrics to allowed drops, e.g. {{'seg/dice': 0.02}}; got {tolerance!r}")
    unknown = sorted(set(tolerance) - set(METRICS))
    # not `v < 0`: NaN passes it, and then the metric fails every check without a reason
    if unknown or not all(is_finite(v) and v >= 0 for v in tolerance.values()):
        raise ValueError(f"tolerance maps metrics of {METRICS} to allowed drops >= 0, got {dict(tolerance)!r}")


def joint_vs_single_task(table, max_compute_share: float = 0.35, tolerance: Mapping[str, float] | None = None,
                         joint: str = "joint", baseline: str = "scratch") -> dict:
    """The acceptance check: does (d) cost at most `max_compute_share` of (e), and score as well?

    Compute shares are given three ways (fine-tuning only, amortised, total with all of the
    pre-training; the baseline's own share of it too when it is a fine-tune of the representation)
    for FLOPs, wall time and CPU time; each must be within max_compute_share (CPU
    time too: on a machine shared with other jobs wall time alone can pass or fail by luck). A
    metric passes when the joint model's value is at least the baseline's minus its tolerance
    (default UMSRepConfig.tolerance: 0.02 for scores on a 0-1 scale, i.e. 2 points, and 0.5 dB of
    PSNR). `passed` uses the fine-tuning-only shares; `passed_amortised` and
    `passed_with_pretraining` the amortised and total ones.
    A share that could not be measured is NaN: a resumed run's CPU time is unknown (train_and_measure),
    and so are the CPU shares of a comparison that resumed (d), (e) or the pre-training. Such a share
    is left out of the verdicts, which then rest on the shares that were measured (and the metrics),
    and `unmeasured` lists it (e.g. ["cpu_share_train", ...]; [] when every share was measured), so
    that a resumed comparison gets the verdict of an uninterrupted one, short of its unknown shares.
    """
    import pandas as pd

    tolerance = UMSRepConfig().tolerance if tolerance is None else tolerance
    _check_acceptance(max_compute_share, tolerance)
    tolerance = dict(tolerance)
    if not isinstance(table, pd.DataFrame):  # a dict failed on "'dict' object has no attribute 'index'"
        raise ValueError(f"table must be the strategy table, a DataFrame indexed by strategy (compare_strategies("
                         f"...) or strategy_table(runs, config)), got {type(table).__name__}")
    for name in (joint, baseline):
        if name not in table.index:
            raise ValueError(f"the table has no {name!r} row (rows: {list(table.index)}); run both strategies")
    if joint == baseline:  # every share 1 and every delta 0: a check of nothing that can only pass the metrics
        raise ValueError(f"joint and baseline are both {joint!r}; compare two strategies, e.g. joint='joint', "
                         "baseline='scratch'")
    d, e = table.loc[joint], table.loc[baseline]
    result = {}
    for kind in ("train", "amortised", "total"):
        # like for like: a baseline that reuses the representation too is charged its share of it
        result[f"flops_share_{kind}"] = float(d[f"{kind}_gflops"] / e[f"{kind}_gflops"])
        prefix = "" if kind == "train" else f"{kind}_"
        result[f"time_share_{kind}"] = float(d[f"{prefix}wall_time_s"] / e[f"{prefix}wall_time_s"])
        result[f"cpu_share_{kind}"] = float(d[f"{prefix}cpu_time_s"] / e[f"{prefix}cpu_time_s"])
    metrics_ok = True
    for metric, allowed in tolerance.items():
        delta = float(d[metric] - e[metric])
        result[f"delta_{metric}"] = delta
        ok = delta >= -allowed - 1e-9  # a missing metric (NaN) fails; 1e-9: 0.78 - 0.80 is -0.020000000000000018
        result[f"ok_{metric}"] = ok
        metrics_ok &= ok
    result["metrics_ok"] = metrics_ok
    # NaN <= limit is False: an unknown share would fail every verdict with no reason given
    shares = {key: value for key, value in result.items() if "_share_" in key}
    result["unmeasured"] = [key for key, value in shares.items() if math.isnan(value)]
    for suffix, kind in (("", "train"), ("_amortised", "amortised"), ("_with_pretraining", "total")):
        known = [shares[f"{name}_share_{kind}"] for name in ("flops", "time", "cpu")
                 if f"{name}_share_{kind}" not in result["unmeasured"]]
        result[f"passed{suffix}"] = bool(metrics_ok and all(share <= max_compute_share + 1e-9 for share in known))
    return result
