"""The datasets data_fetch knows: where each file lives, its checksum, and which folder it goes to.

Facts gathered from each dataset's publication and host page. All are direct downloads without a
login; none may be redistributed, so the course downloads them on the user's machine. The BUSI
checksum was pinned by another project (not by the authors); BUS-UCLM publishes none, so its first
download prints one to pin.
"""

from __future__ import annotations

from dataclasses import dataclass

ZENODO_MEDSEGBENCH = "https://zenodo.org/records/13358372/files"
ZENODO_MEDMNIST = "https://zenodo.org/records/10519652/files"


@dataclass(frozen=True)
class Source:
    """One downloadable file."""

    name: str  # what you type: python -m data_fetch NAME
    url: str  # direct download link
    known_hash: str | None  # "md5:<hex>" or "sha256:<hex>"; None where the publisher gives none
    filename: str  # the downloaded file's name inside the dataset folder
    folder: str  # the dataset folder under the data root (several files may share one)
    extract: bool  # a zip archive, unpacked into the dataset folder
    description: str  # one line for `python -m data_fetch list`
    hash_is_official: bool = True  # False: pinned by someone else, so a mismatch may be a re-packed archive
    host_unreliable: bool = False  # the host often fails: the manual instructions suggest a mirror (--url)


SOURCES = {
    source.name: source
    for source in (
        Source(
            "busi", "https://scholar.cu.edu.eg/Dataset_BUSI.zip",
            "sha256:b2ce09f6063a31a73f628b6a6ee1245187cbaec225e93e563735691d68654de7",
            "Dataset_BUSI.zip", "busi", True,
            "BUSI (Al-Dhabyani et al. 2020): 780 PNGs, normal/benign/malignant + masks; host TLS is unreliable",
            hash_is_official=False, host_unreliable=True,
        ),
        Source(
            "busi_128", f"{ZENODO_MEDSEGBENCH}/busi_128.npz?download=1", "md5:68877751adef0ab639de73946aac0985",
            "busi_128.npz", "busi_npz", False,
            "BUSI benign+malignant pre-resized to 128 px (MedSegBench), official splits",
        ),
        Source(
            "busi_256", f"{ZENODO_MEDSEGBENCH}/busi_256.npz?download=1", "md5:198aea70968b71adf593b32c41a6e995",
            "busi_256.npz", "busi_npz", False,
            "BUSI benign+malignant pre-resized to 256 px (MedSegBench), official splits",
        ),
        Source(
            "bus_bra", "https://zenodo.org/records/8231412/files/BUSBRA.zip?download=1",
            "md5:1f8b2be6476d58fc97bfb5e5a1ea9bab", "BUSBRA.zip", "bus_bra", True,
            "BUS-BRA (Gomez-Flores et al. 2024): 1,875 PNGs of 1,064 patients, benign/malignant + masks, 134 MB",
        ),
        Source(
            "bus_uclm", "https://prod-dcd-datasets-cache-zipfiles.s3.eu-west-1.amazonaws.com/7fvgj4jsp7-1.zip",
            None, "7fvgj4jsp7-1.zip", "bus_uclm", True,  # the host's name: the zip inside may be BUS-UCLM.zip
            "BUS-UCLM (Vallez et al. 2025): 683 PNGs of 38 patients, colour masks, Doppler/caliper flags",
        ),
        Source(
            "breastmnist", f"{ZENODO_MEDMNIST}/breastmnist.npz?download=1", "md5:750601b1f35ba3300ea97c75c52ff8f6",
            "breastmnist.npz", "breastmnist", False,
            "BreastMNIST (MedMNIST v2), 28 px, classification only, official splits",
        ),
        Source(
            "breastmnist_224", f"{ZENODO_MEDMNIST}/breastmnist_224.npz?download=1",
            "md5:b56378a6eefa9fed602bb16d192d4c8b", "breastmnist_224.npz", "breastmnist", False,
            "BreastMNIST (MedMNIST v2), 224 px, classification only, official splits",
        ),
    )
}


def get_source(name: str) -> Source:
    """The Source called `name`; ValueError listing the valid names otherwise."""
    if name not in SOURCES:
        raise ValueError(f"unknown dataset {name!r}; data_fetch knows {', '.join(SOURCES)}")
    return SOURCES[name]
