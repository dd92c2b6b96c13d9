"""Tiny fake copies of the real datasets' layouts and quirks, written into a temporary folder.

No real image is ever stored in the repository: every file here is drawn from random numbers.
Each `make_*` returns what a test needs to know about what it wrote.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = (40, 48)  # (H, W) of the fake images

# The fixtures reproduce the archives' quirks on purpose (a BUSI image without its mask, a BUS-UCLM mask of
# another size, an INFO.csv that disagrees with the mask), and every load reports them in a UserWarning; a
# pytest.mark.filterwarnings filter for tests that are about something else.
QUIRK_REPORTS = r"ignore:(busi|bus_uclm). \d+ (note|image/mask pair):UserWarning"


def random_image(rng: np.random.Generator, size=SIZE) -> np.ndarray:
    """(H, W) uint8 blocky random picture: different seeds give clearly different perceptual hashes."""
    blocks = rng.integers(0, 256, (8, 8)).astype(np.uint8)
    return np.asarray(Image.fromarray(blocks).resize(size[::-1], Image.Resampling.NEAREST))


def box_mask(top: int, left: int, height: int, width: int, size=SIZE) -> np.ndarray:
    """(H, W) bool rectangle."""
    mask = np.zeros(size, dtype=bool)
    mask[top : top + height, left : left + width] = True
    return mask


def save_png(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(path)


def make_busi(root: Path, per_class: int = 10, seed: int = 0) -> dict:
    """Dataset_BUSI_with_GT/{benign,malignant,normal}/ with the BUSI quirks.

    - "benign (1)" has three masks, "_mask", "_mask_1" and "_mask_2": the left, middle and right
      part of the lesion (their union is the lesion, as in the 17 real images with extra masks);
    - "benign (2)" has an RGB mask, "malignant (1)" an RGBA mask;
    - "benign (4)" is a near-duplicate of "benign (3)" (the same picture plus faint noise);
    - normal images have all-zero masks, and "normal (1)" has no mask file at all;
    - "benign (99)" has no mask (skipped), images are stored as RGB like the real ones.
    """
    rng = np.random.default_rng(seed)
    base = root / "Dataset_BUSI_with_GT"
    masks = {}
    for class_name in ("benign", "malignant", "normal"):
        for n in range(1, per_class + 1):
            stem = f"{class_name} ({n})"
            picture = random_image(rng)
            if stem == "benign (4)":
                noise = rng.integers(-2, 3, SIZE)
                picture = np.clip(masks["benign (3) picture"].astype(int) + noise, 0, 255).astype(np.uint8)
            masks[f"{stem} picture"] = picture
            save_png(base / class_name / f"{stem}.png", picture, mode="RGB")
            if class_name == "normal":
                if n != 1:
                    save_png(base / class_name / f"{stem}_mask.png", np.zeros(SIZE, np.uint8))
                masks[stem] = np.zeros(SIZE, bool)
                continue
            lesion = box_mask(8 + n % 5, 6 + n % 7, 14, 18)
            masks[stem] = lesion
            grey = lesion.astype(np.uint8) * 255
            if stem == "benign (1)":  # lesion columns 7..24, cut at 13 and 19
                for suffix, columns in (("", slice(0, 13)), ("_1", slice(13, 19)), ("_2", slice(19, None))):
                    part = np.zeros_like(lesion)
                    part[:, columns] = lesion[:, columns]
                    save_png(base / class_name / f"{stem}_mask{suffix}.png", part.astype(np.uint8) * 255)
            elif stem == "benign (2)":
                save_png(base / class_name / f"{stem}_mask.png", grey, mode="RGB")
            elif stem == "malignant (1)":
                save_png(base / class_name / f"{stem}_mask.png", grey, mode="RGBA")
            else:
                save_png(base / class_name / f"{stem}_mask.png", grey)
    save_png(base / "benign" / "benign (99).png", random_image(rng), mode="RGB")
    return {"base": base, "masks": {k: v for k, v in masks.items() if not k.endswith("picture")}}


def make_bus_bra(root: Path, patients: int = 20, seed: int = 0) -> dict:
    """BUSBRA/{Images,Masks}, bus_data.csv and 5-fold-cv.csv; every second patient has two images."""
    rng = np.random.default_rng(seed)
    base = root / "BUSBRA"
    data_rows, fold_rows = ["ID,Case,Histology,Pathology,BIRADS,Device"], ["ID,kFold"]
    cases = {}
    for case in range(1, patients + 1):
        pathology = "malignant" if case % 3 == 0 else "benign"
        for side in ("l", "r") if case % 2 == 0 else ("l",):
            image_id = f"bus_{case:04d}-{side}"
            save_png(base / "Images" / f"{image_id}.png", random_image(rng))
            save_png(base / "Masks" / f"mask_{case:04d}-{side}.png", box_mask(10, 10, 12, 16).astype(np.uint8) * 255)
            data_rows.append(f"{image_id},{case},x,{pathology},4,GE")
            fold_rows.append(f"{image_id},{(case - 1) % 5 + 1}")  # patient-level folds 1..5
            cases[image_id] = str(case)
    (base / "bus_data.csv").write_text("\n".join(data_rows) + "\n")
    (base / "5-fold-cv.csv").write_text("\n".join(fold_rows) + "\n")
    return {"base": base, "cases": cases}


UCLM_COLOURS = {0: (0, 0, 0), 1: (0, 255, 0), 2: (255, 0, 0)}  # normal black, benign green, malignant red


def make_bus_uclm(root: Path, patients: int = 12, per_patient: int = 3, seed: int = 0) -> dict:
    """BUS-UCLM/{images,masks}/<PATIENT>_<NNN>.png with colour masks and INFO.csv (';').

    - "PAT00_001"'s image is cropped (smaller than its mask): a size mismatch;
    - "PAT01_000" (benign) is drawn in a dark green (0, 120, 0);
    - "PAT02_000" (malignant) holds a red (250, 0, 0) lesion and a separate green one;
    - "PAT03_001" (benign by its mask colour) is "malignant" in INFO.csv.
    `truth[stem]["mask"]` is the (H, W) bool lesion mask the loader should give.
    """
    rng = np.random.default_rng(seed)
    base = root / "dataset" / "BUS-UCLM"  # one extra level, like the Mendeley download
    rows, truth, info_disagrees = ["Image;Label;Doppler;Marks"], {}, {}
    for p in range(patients):
        for k in range(per_patient):
            stem = f"PAT{p:02d}_{k:03d}"
            label = (p + k) % 3
            image = random_image(rng)
            if stem == "PAT00_001":
                image = image[:-6, :-4]  # cropped relative to its mask
            lesion = box_mask(9, 11, 15, 17) if label else np.zeros(SIZE, bool)
            colour = np.zeros((*SIZE, 3), np.uint8)
            colour[lesion] = UCLM_COLOURS[label]
            if stem == "PAT01_000":
                colour[lesion] = (0, 120, 0)
            elif stem == "PAT02_000":
                red, green = box_mask(5, 5, 10, 10), box_mask(22, 30, 10, 10)
                colour[lesion] = 0
                colour[red], colour[green] = (250, 0, 0), (0, 255, 0)
                lesion = red | green
            save_png(base / "images" / f"{stem}.png", image)
            save_png(base / "masks" / f"{stem}.png", colour)
            doppler, marks = int(k == 1), int(p % 4 == 0)
            stated = ("normal", "benign", "malignant")[label]
            if stem == "PAT03_001":
                stated = info_disagrees[stem] = "malignant"
            rows.append(f"{stem}.png;{stated};{doppler};{marks}")
            truth[stem] = {"label": label, "artifact": int(doppler or marks), "patient": f"PAT{p:02d}", "mask": lesion}
    (base / "INFO.csv").write_text("\n".join(rows) + "\n")
    return {"base": base, "truth": truth, "mismatched": ["PAT00_001"], "info_disagrees": info_disagrees}


def make_breastmnist(root: Path, resolution: int = 28, counts=(12, 4, 6), seed: int = 0) -> Path:
    """breastmnist[_224].npz with train/val/test images (N, r, r) uint8 and labels (N, 1)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in zip(("train", "val", "test"), counts):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, resolution, resolution), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (n, 1), dtype=np.uint8)
    path = root / ("breastmnist.npz" if resolution == 28 else f"breastmnist_{resolution}.npz")
    root.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def make_busi_npz(root: Path, resolution: int = 128, counts=(5, 2, 3), seed: int = 0) -> Path:
    """busi_<resolution>.npz in MedSegBench's layout: per-class arrays C1 (benign), C2 (malignant)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in zip(("train", "val", "test"), counts):
        for code, extra in (("C1", 0), ("C2", 1)):
            arrays[f"{split}_images_{code}"] = rng.integers(0, 256, (n + extra, resolution, resolution), dtype=np.uint8)
            masks = np.zeros((n + extra, resolution, resolution), np.uint8)
            masks[:, 4:20, 6:30] = 1
            arrays[f"{split}_label_{code}"] = masks
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"busi_{resolution}.npz"
    np.savez(path, **arrays)
    return path


def zip_bytes(members: dict[str, bytes]) -> bytes:
    """A zip archive in memory; member names are written as given (even '../evil' or '/abs')."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data)
    return buffer.getvalue()
