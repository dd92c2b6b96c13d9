"""mtlearn: multi-task learning for medical image analysis, a course in notebooks.

    import mtlearn as mt
    model = mt.build_model("course", tasks=("seg", "cls"))
    train = mt.data.load_dataset("synthetic", split="train")

Submodules load on first use (`mt.data`, `mt.engine`, ...), so `import mtlearn` stays quick and a
notebook only pays for what it touches.
"""

from importlib import import_module as _import_module

from mtlearn.utils import count_flops, count_parameters, environment_report, pick_device, seed_everything

__version__ = "0.1.0"

_SUBMODULES = (
    "attribution", "blocks", "checkpoint", "course", "data", "disentangle", "encoder", "engine", "experiments",
    "heads", "losses", "metrics", "mtl", "notebook", "plots", "probes", "train", "umsrep", "utils",
    "weighting", "widgets",
)
_SHORTCUTS = {"build_model": "mtl", "single_task_model": "mtl", "load_model": "mtl", "fit": "engine",
              "evaluate": "engine"}

__all__ = [
    "count_flops", "count_parameters", "environment_report", "pick_device", "seed_everything",
    *_SHORTCUTS, *_SUBMODULES,
]


def __getattr__(name: str):
    if name in _SUBMODULES:
        return _import_module(f"mtlearn.{name}")
    if name in _SHORTCUTS:
        return getattr(_import_module(f"mtlearn.{_SHORTCUTS[name]}"), name)
    raise AttributeError(f"module 'mtlearn' has no attribute {name!r}")


def __dir__() -> list[str]:
    """What `mt.<Tab>` offers: also the submodules and shortcuts that load on first use, not only what is loaded."""
    return sorted({*globals(), *__all__})
