"""Linear probes and 2-D embeddings: what information do a network's features hold?

A linear probe is a logistic regression trained on frozen features to predict a label. If it
predicts the label well, the features encode the label in an easily readable (linear) form; if
it is at chance, they do not (at least not linearly). Probing every encoder for every label gives
a table that shows at a glance whether a representation is disentangled (the ideal case; notebook
04 measures how close the course's DisentangleNet comes: 0.65-0.76 over five seeds):

    probe_matrix(...)                     shape   background
    DisentangleNet encoder A (task)        1.00      0.50     <- background gone (ideal)
    SharedEncoderNet encoder               1.00      1.00     <- background is still there

Generic over labels: any integer key of the data items ("shape", "background", "label",
"artifact", ...). Uses scikit-learn for the probes, PCA and t-SNE.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Mapping
from typing import Callable

import numpy as np
import torch
from torch import nn

from mtlearn.utils import as_array, batches_from, check_int, check_label_pair, check_number, is_int

EMBEDDINGS = ("pca", "tsne")


@torch.no_grad()
def extract_features(
    encoder_or_fn: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    loader,
    device: str | torch.device = "auto",
    label_keys: tuple[str, ...] | None = None,
    model: nn.Module | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Run `encoder_or_fn` over `loader` and collect flat features and every integer label.

    encoder_or_fn: an nn.Module or any function mapping images (B, C, H, W) to features
        (B, D) or feature maps (B, C', h, w); maps are global-average-pooled to (B, C'). For an
        encoder returning a list of stages, the last stage is used; a tuple (net.encode's pair of
        encoders) is refused: pick the one to probe.
    label_keys: which batch keys to collect; None collects every key whose values are integers.
    model: for a plain function, the module it runs (extract_features(lambda x: net.encode(x)[0],
        loader, model=net)): it is put in eval mode meanwhile, as a module given directly is.
        Without it a function runs the network as it is: in training mode BatchNorm would use the
        batch's statistics and update its running ones.
    Returns (features (N, D) float32, {key: (N,) int64}).
    """
    from mtlearn.utils import eval_mode, pick_device

    device = pick_device(device)
    label_keys = _as_keys(label_keys) if label_keys is not None else None
    module = encoder_or_fn if isinstance(encoder_or_fn, nn.Module) else model
    chunks, labels = [], {}
    with contextlib.ExitStack() as stack:
        if module is not None:  # on `device` meanwhile; afterwards its own device, every submodule its own mode
            stack.enter_context(eval_mode(module, device))
        batches = stack.enter_context(batches_from(loader))  # its workers stop at once on an error or Ctrl-C
        for batch in batches:
            if not isinstance(batch, Mapping) or "image" not in batch:  # KeyError 'image', or a TensorDataset's list
                got = f"keys {sorted(batch)}" if isinstance(batch, Mapping) else f"a {type(batch).__name__}"
                raise TypeError(f"every batch must be a dict with an 'image' tensor and the labels, got {got}; make "
                                "the dataset's __getitem__ return such a dict (a TensorDataset yields tuples)")
            features = encoder_or_fn(batch["image"].to(device))
            if isinstance(features, list):  # an encoder that returns every stage: keep the last
                features = features[-1]
            elif isinstance(features, tuple):  # (features_a, features_b) of net.encode: taking one silently would
                raise TypeError(  # probe the wrong encoder under the other's name
                    f"the function returns a tuple of {len(features)} (like net.encode's (features_a, features_b)), "
                    "not one feature tensor: pick one, e.g. lambda x: net.encode(x)[0] for encoder A")
            if not isinstance(features, torch.Tensor):
                got = f"a dict with keys {sorted(features)}" if isinstance(features, dict) else type(features).__name__
                # the encoder of the model passed, when it has one (a MultiTaskUNet has no encoder_a)
                part = next((f"model.{name}" for name in ("encoder_a", "encoder")
                             if isinstance(getattr(module, name, None), nn.Module)),
                            "model.encoder_a of a DisentangleNet, model.encoder of a MultiTaskUNet")
                raise TypeError(f"the probe needs a module that returns a feature tensor (B, C, ...), e.g. "
                                f"{part} (not the whole model), or a function that picks one; got {got}")
            if features.ndim == 4:
                features = features.mean(dim=(2, 3))  # (B, C, h, w) -> (B, C)
            elif features.ndim != 2:
                raise ValueError(f"features must be (B, D) or (B, C, h, w), got {tuple(features.shape)}")
            chunks.append(features.float().cpu().numpy())
            keys = label_keys if label_keys is not None else [k for k, v in batch.items() if _is_int_labels(v)]
            for key in keys:
                if key not in batch:
                    raise ValueError(f"label {key!r} is not in the batch; available keys: {sorted(batch)}")
                values = batch[key]  # class names stay a list of strings through the default collate
                is_list = isinstance(values, (list, tuple))
                values = np.asarray(values) if is_list else torch.as_tensor(values).cpu().numpy()
                labels.setdefault(key, []).append(_class_indices(values, key))
    if not chunks:
        raise ValueError("the loader yielded no batches; check the dataset is not empty")
    return np.concatenate(chunks), {k: np.concatenate(v) for k, v in labels.items()}


def _as_keys(label_keys) -> tuple[str, ...]:
    """("shape",) for "shape": iterated, the name would be its letters ('s', 'h', ...)."""
    keys = (label_keys,) if isinstance(label_keys, str) else tuple(label_keys)
    if not keys or not all(isinstance(k, str) for k in keys):
        raise ValueError(f"label_keys must be a label name or a tuple of them, e.g. ('shape', 'background'), "
                         f"got {label_keys!r}")
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:  # each batch's labels would be collected twice: twice as many labels as features
        raise ValueError(f"label_keys names {repeated} more than once; name each label once, got {label_keys!r}")
    return keys


def _class_indices(values: np.ndarray, name: str) -> np.ndarray:
    """Integer or float `values` as int64 class indices (metrics.class_labels: floats only when whole, as
    0.0/1.0 from a CSV; never NaN, inf or 0.3). Other labels (class names) are returned as they are.

    A plain astype(int64) would turn 0.7 into class 0 and NaN into -2**63, and the probe would go on.
    """
    from mtlearn.metrics import class_labels

    values = np.asarray(values)
    if values.dtype.kind not in "biuf":  # names ("benign") are classes to scikit-learn as they are
        return values
    return class_labels(torch.from_numpy(values), f"label {name!r}").numpy()


def _check_features(features: np.ndarray, name: str) -> None:
    """Raise ValueError if `features` (N, D) has no column or holds NaN or inf: sklearn's own message
    advises another estimator, when the encoder that made them is what went wrong."""
    if features.shape[1] == 0:
        raise ValueError(f"{name} have no columns (shape {features.shape}); pass the encoder's features, (N, D) "
                         "with D >= 1")
    if not (np.issubdtype(features.dtype, np.number) or features.dtype == bool):  # text, objects: sklearn's error
        raise ValueError(f"{name} must be numbers, got an array of {features.dtype}")
    bad = int(np.size(features) - np.isfinite(features).sum())
    if bad:
        raise ValueError(f"{name} hold {bad} NaN or inf value(s) of {np.size(features)}: the encoder that made them "
                         "diverged (or its images held NaN); retrain it, e.g. with a lower lr, before probing")


def refuse_shuffling(loader, name: str, consequence: str) -> None:
    """A ValueError for a loader that shuffles, where cross-validated probes read its items: the folds follow
    the items' order, so each pass would score other folds (and a list of patients, given in the loader's
    order, would no longer match its images)."""
    if shuffles(loader):
        raise ValueError(f"{name} shuffles (shuffle=True, or a random sampler), so {consequence}; pass a loader "
                         "with shuffle=False (the folds are shuffled with `seed`)")


def shuffles(loader) -> bool:
    """True when a DataLoader draws its items in a random order: shuffle=True, a random or weighted sampler, a
    shuffling DistributedSampler, or a batch_sampler built on one of them."""
    data = torch.utils.data
    sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None) or getattr(loader, "sampler", None)
    random = (data.RandomSampler, data.SubsetRandomSampler, data.WeightedRandomSampler)
    return isinstance(sampler, random) or (isinstance(sampler, data.DistributedSampler) and sampler.shuffle)


def _is_int_labels(value) -> bool:
    return isinstance(value, torch.Tensor) and value.ndim == 1 and not value.is_floating_point()


def linear_probe(
    features_train: np.ndarray,
    y_train: np.ndarray,
    features_test: np.ndarray,
    y_test: np.ndarray,
    C: float = 1.0,
    max_iter: int = 2000,
) -> dict[str, float]:
    """Fit a standardised logistic regression on (features_train, y_train); score on the test set.

    features_*: (N, D); y_*: (N,) integer labels. Classes are weighted by inverse frequency, so a
    probe cannot look good by predicting the majority class.
    Returns {"balanced_accuracy", "accuracy", "chance"} with chance = 1 / number of classes
    (the balanced accuracy of a constant or random guess).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    C = check_number("C", C, 0, above=True, advice="the inverse regularisation strength; 1.0 is sklearn's default")
    check_int("max_iter", max_iter, 1)
    features_train, features_test = as_array(features_train), as_array(features_test)
    y_train, y_test = as_array(y_train), as_array(y_test)
    for name, f, y in (("train", features_train, y_train), ("test", features_test, y_test)):
        if f.ndim != 2 or y.ndim != 1 or len(f) != len(y):
            raise ValueError(f"{name}: expected features (N, D) and labels (N,), got {f.shape} and {y.shape}")
        _check_features(f, f"{name} features")
    y_train, y_test = _class_indices(y_train, "y_train"), _class_indices(y_test, "y_test")
    if features_train.shape[1] != features_test.shape[1]:
        raise ValueError(f"train and test features differ in width: {features_train.shape[1]} vs "
                         f"{features_test.shape[1]}")
    classes = np.unique(y_train)
    if len(classes) < 2:
        raise ValueError(f"the probe needs at least two classes in y_train, got only {classes.tolist()}")
    unseen = np.setdiff1d(y_test, classes)
    if len(unseen):  # never predicted: its recall is 0, and chance (1 / the train classes) would be wrong too
        raise ValueError(f"y_test holds class(es) {unseen.tolist()} that y_train lacks, so the probe can never "
                         f"predict them (train classes: {classes.tolist()}); fit on a set that has every class")
    absent = np.setdiff1d(classes, y_test)
    if len(absent):  # balanced accuracy would average the classes present only: 1.0 for "always class 0"
        raise ValueError(f"y_test has no item of class(es) {absent.tolist()} (train classes: {classes.tolist()}), so "
                         "its balanced accuracy cannot be compared with chance; test on a set that has every class")
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, class_weight="balanced"))
    with threadpool_limits(limits=1):  # a small problem: extra BLAS threads only contend for the cores
        probe.fit(features_train, y_train)
        predicted = probe.predict(features_test)
    return {
        "balanced_accuracy": float(balanced_accuracy_score(y_test, predicted)),
        "accuracy": float(accuracy_score(y_test, predicted)),
        "chance": 1.0 / len(classes),
    }


class UnevenFoldsError(ValueError):
    """The groups (patients) cannot be split into folds that each hold every class."""


def too_few_for_folds(y: np.ndarray, folds: int, groups: np.ndarray | None = None) -> str | None:
    """Why `folds`-fold cross-validation of labels `y` would mislead, or None when it would not.

    Every class needs `folds` items (with `groups`: items in `folds` different groups) or more: with
    fewer, some test folds hold none of it, and their balanced accuracy is the recall of the other
    classes alone (pure noise features can then read 0.74 against a chance of 0.5).
    """
    classes = np.unique(y)
    if len(classes) < 2:
        return f"the probe needs at least two classes in y, got only {classes.tolist()}"
    if groups is None:
        spread = {c: int((y == c).sum()) for c in classes}
        unit = "item(s)"
    else:
        spread = {c: len(np.unique(groups[y == c])) for c in classes}
        unit = "group(s) (e.g. patients)"
    rare = min(spread, key=spread.get)
    if spread[rare] >= folds:
        return None
    fix = f"pass folds={spread[rare]} or fewer, or probe more images" if spread[rare] >= 2 else "probe more images"
    return (f"class {rare} has {spread[rare]} {unit}, fewer than folds={folds}: some test folds would hold none "
            f"of it and score the other classes alone; {fix}")


GROUPED_SHUFFLES = 20  # shuffles of the groups cross_validated_probe tries for folds that all hold every class


def _grouped_folds(y: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> list:
    """StratifiedGroupKFold's (train, test) index pairs shuffled with `seed`, or with the next seed whose test
    folds all hold every class (see cross_validated_probe). Its assignment of a few uneven groups is greedy,
    and which shuffles leave a class out depends on the scikit-learn version (1.7 and 1.8 split the same
    groups differently), so one seed alone made a probe fail on one version and pass on the next."""
    from sklearn.model_selection import StratifiedGroupKFold

    classes, first = np.unique(y), None
    for attempt in range(GROUPED_SHUFFLES):
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=(seed + attempt) % 2**32)
        splits = list(splitter.split(np.zeros((len(y), 1)), y, groups))
        gaps = [(fold, np.setdiff1d(classes, y[te])) for fold, (_, te) in enumerate(splits)]
        gap = next(((fold, missing) for fold, missing in gaps if len(missing)), None)
        if gap is None:
            return splits
        first = first or gap
    fold, missing = first
    raise UnevenFoldsError(f"test fold {fold + 1} of {folds} holds no item of class {missing[0]} (nor did the folds of "
                           f"the next {GROUPED_SHUFFLES - 1} seeds hold every class): its groups are too few or too "
                           f"uneven to split {folds} ways; pass fewer folds, or probe more groups")


def cross_validated_probe(features: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0,
                          groups: np.ndarray | None = None) -> dict[str, float]:
    """linear_probe averaged over stratified K folds of one set (features (N, D), y (N,)).

    groups: (N,) the group of every item (e.g. its patient), or None. With groups, no group has items
    on both sides of a fold (StratifiedGroupKFold): several images of one patient on both sides let
    the probe read a label through who the patient is, and score well on features that do not
    encode the label at all. Every class needs items in `folds` groups (`folds` items without
    groups) or more, else the folds mislead (too_few_for_folds) and a ValueError says so. With
    groups that is not always enough: a class spread unevenly over a few patients can still miss a
    test fold, whose balanced accuracy would then be one class's recall. The folds shuffled with
    `seed` are then replaced by those of seed + 1, seed + 2, ... (GROUPED_SHUFFLES in all), the first
    whose test folds all hold every class; when none does, an UnevenFoldsError (a ValueError) says so.
    """
    from sklearn.model_selection import StratifiedKFold

    features, y = as_array(features), as_array(y)
    if features.ndim != 2 or y.ndim != 1 or len(features) != len(y):
        raise ValueError(f"expected features (N, D) and labels (N,) with the same N, got features {features.shape} "
                         f"and labels {y.shape}")
    _check_features(features, "features")
    y = _class_indices(y, "y")  # NaN labels were "class nan has 0 item(s)": y == nan is never true
    if not is_int(folds) or folds < 2:
        raise ValueError(f"folds must be an int >= 2, got {folds!r}")
    if groups is not None:
        groups = np.asarray(groups)
        if groups.shape != y.shape:
            raise ValueError(f"groups must name one group per item ({len(y)}), got shape {groups.shape}")
    problem = too_few_for_folds(y, folds, groups)
    if problem:
        raise ValueError(problem)
    if groups is None:  # StratifiedKFold puts every class in every fold
        splits = list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(features, y))
    else:
        splits = _grouped_folds(y, groups, folds, seed)
    scores = [linear_probe(features[tr], y[tr], features[te], y[te]) for tr, te in splits]
    return {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}


def probe_matrix(
    encoders: dict[str, nn.Module | Callable],
    train_loader,
    test_loader=None,
    label_keys: tuple[str, ...] = ("shape", "background"),
    device: str | torch.device = "auto",
    folds: int = 5,
    seed: int = 0,
    model: nn.Module | None = None,
):
    """Balanced accuracy of a linear probe for every (encoder, label) pair, as a DataFrame.

    encoders: {row name: encoder or function}, e.g. {"disentangle A": model.encoder_a}.
    model: the module the functions among `encoders` run, put in eval mode meanwhile (see
        extract_features); encoders given as modules are switched themselves.
    With `test_loader`, each probe is fitted on train_loader's features and scored on
    test_loader's; without it, `folds`-fold cross-validation on train_loader's features, the same
    folds for every encoder (train_loader must not shuffle: its items are read once per encoder).
    Returns a pandas DataFrame, rows: encoder names, columns: label_keys.
    """
    import pandas as pd

    if not encoders:
        raise ValueError("encoders is empty; pass e.g. {'encoder A': model.encoder_a}")
    label_keys = _as_keys(label_keys)
    if test_loader is None:
        refuse_shuffling(train_loader, "train_loader", "every encoder would be probed on other folds of the data")
    table, first_labels = {}, None
    for name, encoder in encoders.items():
        f_train, y_train = extract_features(encoder, train_loader, device, label_keys, model=model)
        if first_labels is None:
            first_labels = y_train
        elif test_loader is None and any(not np.array_equal(first_labels[k], y_train[k]) for k in label_keys):
            raise ValueError(f"train_loader gave encoder {name!r} its items in another order than the first encoder "
                             "(a shuffling sampler?), so the rows would be probed on other folds; pass a loader "
                             "that yields the same items in the same order on every pass")
        f_test, y_test = (extract_features(encoder, test_loader, device, label_keys, model=model)
                          if test_loader is not None else (None, None))
        row = {}
        for key in label_keys:
            try:
                if test_loader is not None:
                    row[key] = linear_probe(f_train, y_train[key], f_test, y_test[key])["balanced_accuracy"]
                else:
                    row[key] = cross_validated_probe(f_train, y_train[key], folds, seed)["balanced_accuracy"]
            except ValueError as error:  # say which probe of the table could not be fitted
                raise ValueError(f"probing encoder {name!r} for {key!r}: {error}") from None
        table[name] = row
    return pd.DataFrame.from_dict(table, orient="index")[list(label_keys)]


def embed_2d(features: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """Project features (N, D) to (N, 2) with PCA or t-SNE (standardised first).

    seed: the methods' random_state. t-SNE starts from the PCA projection and takes exact gradients up to
    500 points: for such sets of a few hundred features (the course's) its picture does not depend on the
    seed; with more features sklearn's randomised PCA start makes it depend on it.
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from sklearn.preprocessing import StandardScaler

    if method not in EMBEDDINGS:
        raise ValueError(f"unknown method {method!r}; expected one of {EMBEDDINGS}")
    features = as_array(features).astype(np.float64)
    if features.ndim != 2 or len(features) < 3 or features.shape[1] < 2:  # 2-D needs 2 columns to come from
        raise ValueError(f"features must be (N, D) with N >= 3 and D >= 2, got {features.shape}; one feature "
                         "per image is a 1-D picture already: plot it against the labels")
    _check_features(features, "features")
    if not np.ptp(features, axis=0).any():  # PCA divided 0 by 0 (zeros, with a warning), t-SNE failed on the NaN
        raise ValueError("the features are the same for every image, so there is nothing to embed (a collapsed or "
                         "untrained encoder?)")
    scaled = StandardScaler().fit_transform(features)
    if method == "pca":
        return PCA(n_components=2, random_state=seed).fit_transform(scaled)
    perplexity = min(30.0, (len(features) - 1) / 3)  # t-SNE needs perplexity < N
    # exact gradients for small sets: as fast as Barnes-Hut there, and free of its thread spin-up
    solver = "exact" if len(features) <= 500 else "barnes_hut"
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", method=solver, random_state=seed)
    return tsne.fit_transform(scaled)


# Okabe & Ito (2008), "Color Universal Design": told apart with every common colour-vision deficiency;
# ordered so that neighbours contrast (orange / blue, green / purple, ...), yellow (faint on white) last
OKABE_ITO = ("#E69F00", "#0072B2", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442")


def plot_embedding(embedding: np.ndarray, labels: dict[str, np.ndarray], title: str = "",
                   class_names: dict | None = None, method: str = "PCA"):
    """Scatter a (N, 2) embedding once per label, points coloured by that label's classes.

    labels: {label name: (N,) ints}; class_names: optional {label name: sequence of class names}.
    method: what made the embedding, for the axes: embed_2d's name ("pca", "tsne") or any text.
    Returns the matplotlib Figure (one panel per label).
    """
    import matplotlib
    import matplotlib.pyplot as plt

    embedding = np.asarray(embedding)
    if embedding.ndim != 2 or embedding.shape[1] != 2:
        raise ValueError(f"embedding must be (N, 2), got {embedding.shape}")
    if not isinstance(labels, Mapping):  # one label's array: "'numpy.ndarray' object has no attribute 'items'"
        raise TypeError(f"labels must be a dict {{label name: (N,) ints}}, got a {type(labels).__name__}; name it, "
                        "e.g. plot_embedding(points, {'shape': labels['shape']})")
    labels = {key: np.asarray(y) for key, y in labels.items()}
    wrong = {key: len(y) for key, y in labels.items() if y.shape != (len(embedding),)}
    if wrong:  # else NumPy's "boolean index did not match", or points coloured by another item's label
        raise ValueError(f"labels must be one (N,) array per name with N = {len(embedding)} (the embedding's points, "
                         f"in its order); got lengths {wrong}")
    if class_names is not None and not isinstance(class_names, Mapping):
        raise TypeError(f"class_names must be a dict {{label name: class names}}, got a {type(class_names).__name__}; "
                        f"e.g. {{{next(iter(labels), 'shape')!r}: ['circle', 'bar']}}")
    for key, names in (class_names or {}).items():  # else an IndexError while drawing
        values = labels.get(key, np.array([]))
        if values.dtype.kind in "iu" and len(values) and (values.min() < 0 or values.max() >= len(names)):
            raise ValueError(f"class_names[{key!r}] names {len(names)} classes, but {key!r} holds the classes "
                             f"{np.unique(values).tolist()}; give one name per class 0, 1, ...")
    method = {"pca": "PCA", "tsne": "t-SNE"}.get(method, method)  # embed_2d's names, as the axes spell them
    fig, axes = plt.subplots(1, len(labels), figsize=(4.2 * len(labels), 3.8), squeeze=False)
    # each label its own colours: with the same blue and orange for "circle / bar" and "black / white", a
    # reader matched the panels' colours as if they meant the same classes. Okabe and Ito's palette stays
    # distinguishable to colour-blind readers (tab10's next pair is green and red), and each class has its own
    # marker too, not reused by another label's classes (o for both "circle" and "black" invited the same
    # match); past its 7 colours, tab20's 20
    palette = OKABE_ITO
    if sum(len(np.unique(y)) for y in labels.values()) > len(palette):
        palette = [matplotlib.colors.to_hex(c) for c in plt.get_cmap("tab20").colors]
    colours = iter(palette * len(embedding))
    markers = itertools.cycle("os^Dv<>P*X")
    for ax, (key, y) in zip(axes[0], labels.items()):
        for value, marker in zip(np.unique(y), markers):
            named = class_names and key in class_names and y.dtype.kind in "iu"  # string labels name themselves
            name = class_names[key][value] if named else str(value)
            points = embedding[y == value]
            ax.scatter(points[:, 0], points[:, 1], s=10, alpha=0.7, color=next(colours), marker=marker,
                       label=f"{key} = {name}")
        ax.set_title(f"{title} coloured by {key}".strip())
        ax.set_xlabel(f"{method} 1")
        ax.set_ylabel(f"{method} 2")
        if method.lower().replace("-", "") == "tsne":  # t-SNE's coordinates mean nothing: only who sits together
            ax.set_xticks([])
            ax.set_yticks([])
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_probe_matrix(table, title: str = "Linear probes (balanced accuracy)", chance: float = 0.5):
    """Heatmap of a probe_matrix table (rows: encoders, columns: labels), each cell annotated.

    Colours run from `chance` (nothing readable, white) to 1.0 (fully readable, dark).
    Returns the matplotlib Figure.
    """
    import matplotlib.pyplot as plt
    import pandas as pd

    if isinstance(table, Mapping):  # {"encoder": {"label": accuracy}}: float() of a dict failed
        table = pd.DataFrame.from_dict(table, orient="index")
    if not isinstance(table, pd.DataFrame):  # its row and column names label the heatmap
        raise TypeError(f"table must be a DataFrame as probe_matrix returns (or a dict of dicts), got a "
                        f"{type(table).__name__}")
    values = np.asarray(table, dtype=float)
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"table must be a non-empty (encoders x labels) table, got shape {values.shape}")
    fig, ax = plt.subplots(figsize=(1.6 * values.shape[1] + 2.6, 0.5 * values.shape[0] + 1.4))
    image = ax.imshow(values, cmap="Blues", vmin=chance, vmax=1.0, aspect="auto")
    for (row, col), value in np.ndenumerate(values):
        ax.text(col, row, f"{value:.2f}", ha="center", va="center", color="white" if value > 0.85 else "black")
    ax.set_xticks(range(values.shape[1]), [str(c) for c in table.columns])
    ax.set_yticks(range(values.shape[0]), [str(i) for i in table.index])
    ax.set_xlabel("label the probe reads")
    ax.set_ylabel("features")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="balanced accuracy")
    fig.tight_layout()
    return fig


def plot_adversary_accuracy(history: dict[str, list[float]], chance: float = 0.5,
                            title: str = "Adversaries during training", chance_label: str = "chance",
                            task_keys: tuple[str, str] = ("shape", "background")):
    """Adversary accuracies per epoch (history from train_disentangle) against a reference level.

    Solid: adv_acc_* (each batch scored before the adversaries' steps on it); dotted, in the same
    colour: adv_fit_acc_* (after those steps, on the batch they were fitted to); dashed with open
    squares: val_adv_acc_*. The legend says in words what each adversary reads: adv_acc_a is task A
    read from task B's features, adv_acc_b task B read from task A's features.
    chance: the dashed grey reference line, e.g. 0.5, or what the other task's label alone allows
    (see the notebook); chance_label: its legend entry.
    task_keys: the names of task A and task B, as given to train_disentangle (default: the shapes
    experiment, A = shape, B = background).
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    check_label_pair(task_keys)
    name_a, name_b = task_keys
    reads = {"a": f"{name_a} read from {name_b} features", "b": f"{name_b} read from {name_a} features"}
    colours = {"a": "tab:blue", "b": "tab:orange"}
    curves = {k: v for k, v in history.items() if k.startswith(("adv_acc", "val_adv_acc"))}
    if not curves:
        raise ValueError(f"history has no adversary accuracies (adv_acc_*); keys: {sorted(history)}")
    fig, ax = plt.subplots(figsize=(6, 5))
    for key, values in curves.items():
        side = key.rsplit("_", 1)[-1]  # "adv_acc_b" -> "b"
        what, colour = reads.get(side, key), colours.get(side)
        epochs = range(1, len(values) + 1)
        if key.startswith("val_"):
            ax.plot(epochs, values, ls="--", marker="s", ms=4, mfc="white", color=colour,
                    label=f"{what}, validation ({key})")
            continue
        line, = ax.plot(epochs, values, marker="o", ms=3, color=colour, label=f"{what} ({key})")
        fitted_key = key.replace("adv_acc", "adv_fit_acc")
        fitted = history.get(fitted_key)
        if fitted is not None:
            ax.plot(range(1, len(fitted) + 1), fitted, ls=":", color=line.get_color(),
                    marker="." if len(fitted) == 1 else None,  # one epoch: a dotted line of one point shows nothing
                    label=f"   same, on the batch it was fitted to ({fitted_key})")
    ax.axhline(chance, color="grey", ls="--", label=chance_label)
    ax.set_ylim(0, 1.02)
    ax.set_xlim(0.5, max(len(v) for v in curves.values()) + 0.5)  # one epoch too: ticks at whole epochs
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10], min_n_ticks=1))  # whole epochs: 5, 10, 15
    ax.set_xlabel("epoch")
    ax.set_ylabel("adversary accuracy")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)  # below, off the curves
    fig.tight_layout()
    return fig
