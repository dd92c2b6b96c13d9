"""Synthetic breast ultrasound: B-mode-like images with lesion masks, drawn on the fly.

Why a synthetic dataset? Real breast ultrasound sets are small, need a download and cannot be
redistributed; a generator gives a course unlimited, labelled, instantly available data, plus
ground truth no real set has: the speckle-free image (a denoising target) and full control over a
nuisance artifact, so that shortcut learning can be switched on and off.

How an image is built (after the physics of B-mode imaging), everything in decibels (dB) of echo level:

1. tissue layers run roughly horizontally: skin (bright), subcutaneous fat (dark),
   fibroglandular tissue (bright, heterogeneous), pectoral muscle (striated);
2. a lesion (benign or malignant) sits in the glandular layer and changes what lies beneath it:
   posterior acoustic enhancement (benign) or shadowing (malignant);
3. depth attenuation darkens the bottom (time-gain compensation only partly corrects it);
4. speckle is multiplicative: a complex Gaussian field whose envelope is Rayleigh distributed,
   mildly correlated laterally; in dB it becomes additive noise;
5. log compression maps the dB levels onto [0, 1] for display;
6. nuisance artifacts (caliper "+" marks, burnt-in text, shadow bands) may be drawn on top.

The "clean" image is the same scene without speckle (step 4), i.e. the target of a denoiser.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

import numpy as np
import torch
from torch.utils.data import Dataset

from mtlearn.data.transforms import check_in_channels
from mtlearn.utils import check_int, check_item_index, check_number, check_size, is_int

CLASS_NAMES = ("normal", "benign", "malignant")
NORMAL, BENIGN, MALIGNANT = 0, 1, 2
ARTIFACT_KINDS = ("calipers", "text", "shadow_band")

DYNAMIC_RANGE_DB = 50.0  # log compression: -50 dB -> 0 (black), 0 dB -> 1 (white)
# Mean echo level of each layer in dB (0 = brightest); order = depth order, top to bottom.
LAYER_DB = np.array([-9.0, -30.0, -17.0, -25.0], dtype=np.float32)  # skin, fat, gland, muscle
LAYER_TEXTURE_DB = np.array([1.0, 2.5, 4.0, 1.5], dtype=np.float32)  # heterogeneity per layer
LESION_DB = (-44.0, -35.0)  # hypoechoic lesion interior; the same range for benign and malignant
# E[10 log10 I] of unit-mean exponential speckle intensity is -10*gamma/ln 10 dB; adding it back
# makes the speckle zero-mean in dB, so `clean` is the mean of `image` (before clipping).
SPECKLE_DB_OFFSET = np.float32(10.0 * np.euler_gamma / np.log(10.0))


class SyntheticUltrasound(Dataset):
    """B-mode-like breast ultrasound with lesion masks, speckle-free targets and artifacts.

    Classes (after the BI-RADS ultrasound descriptors that separate typical masses):

    - 0 normal: tissue layers only, empty mask;
    - 1 benign: oval, smooth circumscribed margin, "wider than tall" (parallel orientation),
      hypoechoic, posterior acoustic enhancement in most cases;
    - 2 malignant: irregular / spiculated, indistinct margin, often "taller than wide",
      hypoechoic (same darkness range as benign), posterior acoustic shadow in most cases.

    Benign and malignant differ in shape, margin and what lies beneath the lesion, never in a global
    brightness (a random receiver gain hides the small mean difference the posterior features add).

    Nuisance artifact: caliper "+" marks, a burnt-in text block and/or a vertical shadow band
    (at least one kind when present). `artifact_correlation` in [-1, 1] ties it to malignancy:

    - 0: the artifact is independent of the class, present with probability `artifact_rate`;
    - +1: present exactly when the lesion is malignant (a perfect shortcut for the classifier);
    - -1: present exactly when the item is NOT malignant (the shortcut reversed);
    - in between, both probabilities move linearly from `artifact_rate` towards 0 or 1:
      P(artifact | malignant) = (1 - c) * rate + c for c >= 0, (1 - |c|) * rate for c < 0, and
      symmetrically for the other classes (see `artifact_probabilities`).

    `class_probs`: the relative frequencies of normal, benign and malignant, normalised to sum to 1
    ((1, 1, 1) is (1/3, 1/3, 1/3)).

    Every item is deterministic given (seed, first_index + index); nothing is stored, so any
    `num_samples` costs no memory. The scene is drawn before the artifact, so forcing the artifact
    on or off (`render(i, artifact=...)`) gives the same scene with and without it.

    Items: "image" (C, H, W) float32 in [0, 1]; "mask" (1, H, W) 0/1; "label" int; "clean"
    (C, H, W); "artifact" int 0/1; "artifact_mask" (1, H, W) 0/1; "id" e.g. "synthetic-00042".
    """

    class_names = CLASS_NAMES
    tasks = ("seg", "cls", "recon")

    def __init__(
        self,
        num_samples: int = 1000,
        image_size: int | Sequence[int] = 128,
        seed: int = 0,
        class_probs: Sequence[float] = (1 / 3, 1 / 3, 1 / 3),
        artifact_correlation: float = 0.0,
        artifact_rate: float = 0.5,
        noise_level: float = 1.0,
        in_channels: int = 1,
        first_index: int = 0,
    ):
        check_int("num_samples", num_samples, minimum=1)
        check_int("seed", seed, minimum=0)
        check_int("first_index", first_index, minimum=0)
        # NumPy splits a seed of 2**32 or more into 32-bit words: [7 + 2**32, i] would draw seed 7's item i + 1
        if seed >= 2**32 or first_index + num_samples > 2**32:
            raise ValueError(f"seed and first_index + num_samples must stay below 2**32, got seed {seed} and "
                             f"first_index + num_samples {first_index + num_samples}: take e.g. seed % 2**32")
        self.height, self.width = _image_size(image_size)
        probs = _class_probs(class_probs)
        check_number("artifact_correlation", artifact_correlation, -1, 1)
        check_number("artifact_rate", artifact_rate, 0, 1)
        check_number("noise_level", noise_level, 0, advice="1.0 = fully developed speckle")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.first_index = int(first_index)
        self.class_probs = tuple(float(p) for p in probs / probs.sum())
        self.class_cdf = np.cumsum(probs / probs.sum())
        self.artifact_correlation = float(artifact_correlation)
        self.artifact_rate = float(artifact_rate)
        self.noise_level = float(noise_level)
        self.in_channels = check_in_channels(in_channels)

        # Precomputed grids: depth runs 0 (skin) -> 1 (bottom), x runs 0 -> 1 (left to right).
        H, W = self.height, self.width
        self.scale = min(H, W) / 128  # pixel sizes below are given for 128 px and scaled by this
        self._depth = ((np.arange(H, dtype=np.float32) + 0.5) / H)[:, None]  # (H, 1)
        self._x = ((np.arange(W, dtype=np.float32) + 0.5) / W)[None, :]  # (1, W)
        self._rows = np.arange(H)[:, None]  # (H, 1) integer row index
        # Tissue texture: an 8 x 8 random field, smoothly interpolated (no matrix products: NumPy's
        # BLAS would start threads for them, which is slow for small images on a busy machine).
        self._texture_rows, self._texture_cols = _upsampler(8, H, "smooth"), _upsampler(8, W, "smooth")
        # Speckle: one scatterer cell per axial pixel (up to 128) and per 2 lateral pixels (up to 64).
        self._speckle_shape = (min(H, 128), max(2, min(W // 2, 64)))
        self._speckle_rows = None if self._speckle_shape[0] == H else _upsampler(self._speckle_shape[0], H, "variance")
        self._speckle_cols = _upsampler(self._speckle_shape[1], W, "variance")

    def __len__(self) -> int:
        return self.num_samples

    def __repr__(self) -> str:
        return (f"SyntheticUltrasound(num_samples={self.num_samples}, image_size={(self.height, self.width)}, "
                f"seed={self.seed}, first_index={self.first_index}, "
                f"class_probs=({', '.join(f'{p:.3g}' for p in self.class_probs)}), "
                f"artifact_correlation={self.artifact_correlation}, "
                f"artifact_rate={self.artifact_rate}, noise_level={self.noise_level}, in_channels={self.in_channels})")

    def __getitem__(self, index: int) -> dict:
        """Item `index` as the dict of tensors described in the class docstring."""
        scene = self.render(index)
        return {
            "image": self._channels(scene["image"]),  # (C, H, W)
            "mask": torch.from_numpy(scene["mask"][None]),  # (1, H, W)
            "label": scene["label"],
            "clean": self._channels(scene["clean"]),  # (C, H, W)
            "artifact": scene["artifact"],
            "artifact_mask": torch.from_numpy(scene["artifact_mask"][None]),  # (1, H, W)
            "id": f"synthetic-{self.first_index + index:05d}",
        }

    def _channels(self, grey: np.ndarray) -> torch.Tensor:
        """(H, W) grey array -> (in_channels, H, W) tensor."""
        tensor = torch.from_numpy(grey[None])  # (1, H, W)
        return tensor if self.in_channels == 1 else tensor.repeat(self.in_channels, 1, 1)

    # ----------------------------------------------------------------------------------------------
    # What each item is: class and artifact, cheap to draw for the whole dataset

    def artifact_probabilities(self) -> tuple[float, float]:
        """(P(artifact | not malignant), P(artifact | malignant)) implied by the correlation knob."""
        c, rate = self.artifact_correlation, self.artifact_rate
        if c >= 0:
            return (1 - c) * rate, (1 - c) * rate + c
        return (1 + c) * rate - c, (1 + c) * rate

    def _item_rng(self, index: int) -> tuple[np.random.Generator, int, int]:
        """Per-item generator, class and artifact flag: the first two draws of the item's stream."""
        index = check_item_index(index, self.num_samples)  # -1 would seed another dataset's item
        rng = np.random.default_rng([self.seed, self.first_index + index])
        u_class, u_artifact = rng.random(2)
        label = int(np.searchsorted(self.class_cdf, u_class, side="right").clip(max=2))
        artifact = int(u_artifact < self.artifact_probabilities()[label == MALIGNANT])
        return rng, label, artifact

    @cached_property
    def labels(self) -> np.ndarray:
        """(N,) class of every item, without drawing any image."""
        return np.array([self._item_rng(i)[1] for i in range(self.num_samples)], dtype=np.int64)

    @cached_property
    def artifacts(self) -> np.ndarray:
        """(N,) artifact flag of every item, without drawing any image."""
        return np.array([self._item_rng(i)[2] for i in range(self.num_samples)], dtype=np.int64)

    # ----------------------------------------------------------------------------------------------
    # Drawing one item

    def render(self, index: int, artifact: bool | None = None) -> dict:
        """Draw item `index` as NumPy arrays: "image", "clean", "mask", "artifact_mask" (H, W).

        `artifact` forces the nuisance artifact on (True) or off (False) for the same scene; None
        keeps the item's own draw.
        """
        rng, label, has_artifact = self._item_rng(index)
        if artifact is not None:
            # True/False, or 1/0 as an item's "artifact" holds them (a batch's, collated, a one-element tensor);
            # "no" and 2 are truthy: the artifact was drawn
            if isinstance(artifact, torch.Tensor) and artifact.numel() == 1 and not artifact.is_floating_point():
                artifact = artifact.item()
            if not (isinstance(artifact, (bool, np.bool_)) or is_int(artifact) and artifact in (0, 1)):
                raise ValueError(f"artifact must be True or 1 (drawn), False or 0 (not drawn), or None (the item's "
                                 f"own), got {artifact!r}")
            has_artifact = int(artifact)
        H, W = self.height, self.width
        texture = self._texture(rng)  # (H, W), unit variance
        db = self._tissue_db(rng, texture)  # (H, W) echo level in dB
        mask = np.zeros((H, W), dtype=np.float32)
        if label != NORMAL:
            self._add_lesion(rng, db, mask, texture, malignant=label == MALIGNANT)
        # depth attenuation (what TGC leaves of it) and a random receiver gain
        db += rng.uniform(-6.0, 6.0) - rng.uniform(6.0, 14.0) * self._depth
        speckle_db = self._speckle_db(rng)
        # The artifact is drawn last, from the same stream, so the scene above never depends on it.
        artifact_mask = np.zeros((H, W), dtype=np.float32)
        overlays = []
        if has_artifact:
            kinds = _pick_kinds(rng)
            if "shadow_band" in kinds:
                db += self._shadow_band_db(rng, artifact_mask)
            if "calipers" in kinds:
                overlays.append(self._calipers(rng, mask))
            if "text" in kinds:
                overlays.append(self._text_block(rng))
        clean = _log_compress(db)
        image = _log_compress(db + np.float32(self.noise_level) * speckle_db)
        for rows, cols, value in overlays:  # burnt into the display, so into both images
            image[rows, cols] = value
            clean[rows, cols] = value
            artifact_mask[rows, cols] = 1.0
        return {"image": image, "clean": clean, "mask": mask, "label": label,
                "artifact": has_artifact, "artifact_mask": artifact_mask}

    def _texture(self, rng: np.random.Generator) -> np.ndarray:
        """Smooth random field (H, W), standard deviation about 1: tissue heterogeneity."""
        coarse = rng.standard_normal((8, 8), dtype=np.float32) * np.float32(1.3)  # makes up for interpolation
        return _upsample(_upsample(coarse, self._texture_rows, axis=0), self._texture_cols, axis=1)  # (H, W)

    def _tissue_db(self, rng: np.random.Generator, texture: np.ndarray) -> np.ndarray:
        """Horizontal layers with wavy boundaries: skin, fat, gland, muscle. (H, W) in dB."""
        x = self._x
        phase = rng.uniform(0, 2 * np.pi, 3).astype(np.float32)
        cycles = rng.uniform(0.5, 1.5, 3).astype(np.float32)
        bottoms = (  # depth of the bottom of skin, fat and gland, each (1, W)
            rng.uniform(0.03, 0.05) + 0.004 * np.sin(2 * np.pi * cycles[0] * x + phase[0]),
            rng.uniform(0.14, 0.26) + rng.uniform(0.01, 0.04) * np.sin(2 * np.pi * cycles[1] * x + phase[1]),
            rng.uniform(0.66, 0.80) + rng.uniform(0.01, 0.04) * np.sin(2 * np.pi * cycles[2] * x + phase[2]),
        )
        # layer index = how many layer bottoms lie above the pixel: 0 skin ... 3 muscle
        layer = sum((self._depth >= bottom).astype(np.int8) for bottom in bottoms)  # (H, W)
        levels = LAYER_DB + rng.normal(0.0, 1.5, 4).astype(np.float32)
        db = levels[layer] + LAYER_TEXTURE_DB[layer] * texture
        # muscle fibres: horizontal striations, computed only from the first row that has muscle
        first = int(np.min(bottoms[2]) * self.height)
        period = rng.uniform(0.03, 0.06)
        striations = 2.5 * np.sin(2 * np.pi * self._depth[first:] / period + rng.uniform(0, 2 * np.pi))  # (H', 1)
        db[first:] += (layer[first:] == 3) * striations
        return db

    def _add_lesion(self, rng, db, mask, texture, malignant: bool) -> None:
        """Draw a benign or malignant mass into `db` and `mask` (both (H, W), changed in place)."""
        H, W, s = self.height, self.width, self.scale
        # size, orientation: benign wider than tall and parallel, malignant often taller than wide
        radius = rng.uniform(9.0, 18.0) * s  # geometric mean of the two semi-axes, in pixels
        if malignant:
            aspect = np.exp(rng.uniform(np.log(0.8), np.log(1.5)))  # height / width; P(>1) ~ 0.65
            tilt = np.deg2rad(rng.uniform(-35.0, 35.0))
        else:
            aspect = rng.uniform(0.45, 0.8)
            tilt = np.deg2rad(rng.normal(0.0, 8.0))
        half_width, half_height = radius / np.sqrt(aspect), radius * np.sqrt(aspect)
        margin = _margin_profile(rng, malignant)  # (256,) boundary radius, 1 = plain ellipse

        # Work in a box around the centre, big enough for the longest spicule.
        extent = int(np.ceil(max(half_width, half_height) * margin.max())) + 4
        cy = int(rng.uniform(0.36, 0.58) * H)
        cx = int(rng.uniform(0.25, 0.75) * W)
        top, bottom = max(cy - extent, 0), min(cy + extent + 1, H)
        left, right = max(cx - extent, 0), min(cx + extent + 1, W)
        dy = np.arange(top, bottom, dtype=np.float32)[:, None] - cy  # (h, 1)
        dx = np.arange(left, right, dtype=np.float32)[None, :] - cx  # (1, w)
        u = (dx * np.cos(tilt) + dy * np.sin(tilt)) / half_width  # (h, w) rotated, ellipse-scaled
        v = (dy * np.cos(tilt) - dx * np.sin(tilt)) / half_height
        rho = np.sqrt(u * u + v * v)  # 1 on the plain ellipse
        angle = np.arctan2(v, u)
        boundary = margin[((angle + np.pi) * (len(margin) / (2 * np.pi))).astype(np.intp) % len(margin)]
        distance = (rho - boundary) * radius  # about the signed distance to the margin, in pixels
        inside = distance < 0
        inside[cy - top, cx - left] = True  # the centre always belongs to the lesion
        mask[top:bottom, left:right] = inside

        # echo level: hypoechoic interior with a sharp (benign) or indistinct (malignant) margin
        softness = (rng.uniform(2.0, 3.5) if malignant else 0.8) * s
        weight = np.clip(0.5 - distance / softness, 0.0, 1.0)
        interior = rng.uniform(*LESION_DB) + 1.5 * texture[top:bottom, left:right]
        box = db[top:bottom, left:right]
        box += weight * (interior - box)
        if malignant and rng.random() < 0.4:  # echogenic halo around the margin
            box += 4.0 * np.clip(1.0 - np.abs(distance - 2.0 * s) / (2.0 * s), 0.0, 1.0)

        # posterior features, under every lesion column: enhancement (benign) or shadow (malignant)
        if malignant:
            strength = -rng.uniform(8.0, 14.0) if rng.random() < 0.8 else 0.0
        else:
            strength = rng.uniform(5.0, 10.0) if rng.random() < 0.75 else 0.0
        thickness = inside.sum(axis=0).astype(np.float32)  # (w,) lesion pixels per column
        last_row = top + inside.shape[0] - 1 - np.argmax(inside[::-1], axis=0)  # (w,) lesion bottom
        below = (self._rows - last_row[None, :]).astype(np.float32)  # (H, w) rows under the lesion
        onset = np.clip(below / (3.0 * s), 0.0, 1.0)
        fade = 1.0 if malignant else np.exp(-np.maximum(below, 0.0) / (0.35 * H))  # shadows persist
        db[:, left:right] += strength * np.sqrt(thickness / thickness.max()) * onset * fade

    def _speckle_db(self, rng: np.random.Generator) -> np.ndarray:
        """Fully developed speckle in dB, (H, W): zero mean, about 5.6 dB standard deviation.

        Scatterers on a grid coarser than the pixels give a complex Gaussian field; linear
        interpolation (with weights renormalised to unit variance) keeps every pixel complex Gaussian,
        so the envelope stays Rayleigh, while neighbouring pixels now share scatterers (correlation).
        """
        field = rng.standard_normal((2, *self._speckle_shape), dtype=np.float32)  # real, imaginary
        if self._speckle_rows is not None:
            field = _upsample(field, self._speckle_rows, axis=1)
        field = _upsample(field, self._speckle_cols, axis=2)  # (2, H, W)
        intensity = field[0] * field[0] + field[1] * field[1] + np.float32(1e-12)  # exponential, mean 2
        speckle_db = np.log10(intensity, out=intensity)
        speckle_db *= np.float32(10.0)
        speckle_db += SPECKLE_DB_OFFSET - np.float32(10.0 * np.log10(2.0))  # 10 log10(I / 2) + offset
        return speckle_db

    # ----------------------------------------------------------------------------------------------
    # Nuisance artifacts

    def _shadow_band_db(self, rng: np.random.Generator, artifact_mask: np.ndarray) -> np.ndarray:
        """Vertical shadow from poor probe contact (from the skin) or a rib (from some depth)."""
        centre, half = rng.uniform(0.1, 0.9), rng.uniform(0.03, 0.06)
        start = 0.0 if rng.random() < 0.5 else rng.uniform(0.2, 0.5)
        across = np.clip(1.0 - np.abs(self._x - centre) / half, 0.0, 1.0)  # (1, W)
        down = (self._depth >= start).astype(np.float32)  # (H, 1)
        artifact_mask[:] = np.maximum(artifact_mask, down * (across > 0))  # everywhere the band darkens
        return (-rng.uniform(10.0, 16.0) * np.sqrt(across) * down).astype(np.float32)

    def _calipers(self, rng: np.random.Generator, mask: np.ndarray):
        """Two "+" marks: at the lesion's left and right ends, or anywhere in the gland if none."""
        H, W = self.height, self.width
        arm = max(2, round(3 * self.scale))
        if mask.any():
            rows, cols = np.nonzero(mask)
            row = int(rows.mean())
            ends = np.nonzero(mask[row])[0]
            points = [(row, ends.min() - 2), (row, ends.max() + 2)]
        else:
            row = int(rng.uniform(0.35, 0.6) * H)
            first = rng.uniform(0.15, 0.5) * W
            points = [(row, int(first)), (row, int(first + rng.uniform(0.15, 0.35) * W))]
        rr, cc = [], []
        for r, c in points:
            r, c = int(np.clip(r, arm, H - arm - 1)), int(np.clip(c, arm, W - arm - 1))
            offsets = np.arange(-arm, arm + 1)
            rr += [r + offsets, np.full_like(offsets, r)]  # vertical arm, horizontal arm
            cc += [np.full_like(offsets, c), c + offsets]
        return np.concatenate(rr), np.concatenate(cc), rng.uniform(0.85, 1.0)

    def _text_block(self, rng: np.random.Generator):
        """A line of 3 x 5 pixel "glyphs" (random bits) burnt into one corner, like scanner text."""
        H, W = self.height, self.width
        g = max(1, round(self.scale))  # glyph pixel size
        n = int(min(rng.integers(3, 8), (W - 4) // (4 * g)))
        bits = rng.random((5, 4 * n)) < 0.55
        bits[:, 3::4] = False  # one blank column between glyphs
        bits = np.kron(bits, np.ones((g, g), dtype=bool))
        top = 2 if rng.random() < 0.5 else H - 2 - bits.shape[0]
        left = 2 if rng.random() < 0.5 else W - 2 - bits.shape[1]
        rows, cols = np.nonzero(bits)
        return rows + top, cols + left, rng.uniform(0.85, 1.0)


# --------------------------------------------------------------------------------------------------
# Helpers


def _margin_profile(rng: np.random.Generator, malignant: bool, n: int = 256) -> np.ndarray:
    """Boundary radius as a function of angle, (n,): smooth oval (benign) or irregular + spicules."""
    theta = np.linspace(-np.pi, np.pi, n, endpoint=False)
    if malignant:  # irregular: many harmonics, then angular spicules
        orders = np.arange(3, 10)[:, None]  # (7, 1) harmonics
        amplitudes = rng.uniform(0.0, 0.18, orders.shape) / np.sqrt(orders)
        phases = rng.uniform(0, 2 * np.pi, orders.shape)
        r = 1.0 + np.sum(amplitudes * np.cos(orders * theta + phases), axis=0)
        count = rng.integers(4, 11)
        centre = rng.uniform(-np.pi, np.pi, (count, 1))
        length, width = rng.uniform(0.25, 0.6, (count, 1)), rng.uniform(0.08, 0.16, (count, 1))  # radii; radians
        gap = (theta - centre + np.pi) % (2 * np.pi) - np.pi  # (count, n) angle to each spicule
        r += np.sum(length * np.clip(1.0 - np.abs(gap) / width, 0.0, None), axis=0)  # triangular spikes
    else:  # circumscribed: nearly elliptical, sometimes gently macrolobulated
        r = 1.0 + rng.uniform(0.0, 0.04) * np.cos(2 * theta + rng.uniform(0, 2 * np.pi))
        if rng.random() < 0.3:
            r += rng.uniform(0.05, 0.1) * np.cos(rng.integers(2, 5) * theta + rng.uniform(0, 2 * np.pi))
    return r.astype(np.float32)


def _pick_kinds(rng: np.random.Generator) -> tuple[str, ...]:
    """A non-empty random subset of ARTIFACT_KINDS, every subset equally likely."""
    code = int(rng.integers(1, 2 ** len(ARTIFACT_KINDS)))
    return tuple(kind for bit, kind in enumerate(ARTIFACT_KINDS) if code >> bit & 1)


def _log_compress(db: np.ndarray) -> np.ndarray:
    """dB echo level -> display grey level in [0, 1] (float32)."""
    grey = db * np.float32(1.0 / DYNAMIC_RANGE_DB)
    grey += np.float32(1.0)
    return np.clip(grey, 0.0, 1.0, out=grey)


def _upsampler(n_in: int, n_out: int, kind: str):
    """Indices and weights that interpolate n_in samples onto n_out pixels: (low, w0, w1).

    Pixel j becomes w0[j] * x[low[j]] + w1[j] * x[low[j] + 1]. kind "smooth": smoothstep weights
    (3t^2 - 2t^3, summing to 1), which hide the coarse grid; kind "variance": linear weights scaled
    so that w0^2 + w1^2 = 1, so that interpolated unit-variance noise keeps unit variance everywhere.
    """
    position = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    low = np.clip(np.floor(position), 0, n_in - 2).astype(np.intp)
    t = np.clip(position - low, 0.0, 1.0)
    if kind == "smooth":
        t = t * t * (3.0 - 2.0 * t)
        w0, w1 = 1.0 - t, t
    else:
        norm = np.sqrt((1.0 - t) ** 2 + t**2)
        w0, w1 = (1.0 - t) / norm, t / norm
    return low, w0.astype(np.float32), w1.astype(np.float32)


def _upsample(field: np.ndarray, upsampler, axis: int) -> np.ndarray:
    """Apply an `_upsampler` along `axis` of `field`."""
    low, w0, w1 = upsampler
    shape = [1] * field.ndim
    shape[axis] = len(low)
    return np.take(field, low, axis=axis) * w0.reshape(shape) + np.take(field, low + 1, axis=axis) * w1.reshape(shape)


def _class_probs(class_probs) -> np.ndarray:
    """class_probs -> (3,) float64 array, or a ValueError naming the argument and what it must be.

    Strings are refused, not converted: NumPy would read ("0.2", "0.3", "0.5") as numbers, and "abc" would
    fail with "could not convert string to float", which does not say which argument is wrong.
    """
    try:
        probs = np.asarray(class_probs)
    except ValueError:  # nested sequences of different lengths
        probs = np.asarray(None)
    if (probs.dtype.kind not in "iuf" or probs.shape != (3,) or not np.all(np.isfinite(probs)) or np.any(probs < 0)
            or probs.sum() <= 0):
        hint = "; pass numbers, not strings" if probs.dtype.kind in "SU" or isinstance(class_probs, str) else ""
        raise ValueError(
            f"class_probs must be 3 finite non-negative numbers (normal, benign, malignant), not all 0, "
            f"got {class_probs!r}{hint}"
        )
    return probs.astype(np.float64)


MIN_SIZE = 32  # px: smaller, a lesion, the shadow band and the artifact no longer fit side by side


def _image_size(image_size) -> tuple[int, int]:
    """128 -> (128, 128); (96, 160) -> (96, 160); anything smaller than MIN_SIZE px (or a float) is refused."""
    return check_size(image_size, minimum=MIN_SIZE)


