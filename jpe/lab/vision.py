"""Image classification with a ViT, and how its 2-D encoding carries to larger images.

`train_vit(VisionConfig(...), workdir)` trains `jpe.nn.vision.VisionTransformer` on the lab's
training core (`jpe.lab.core`: AdamW, the cross-entropy, Orbax checkpoints, the loop), then
measures top-1 accuracy on the held-out images at every size of `eval_sizes`, under two
protocols:

- canvas (`"accuracy"`, the default protocol): each image is placed at a random patch-aligned
  offset on a blank (zero) square canvas: `train_size` pixels a side in training, each of
  `eval_sizes` at test. The digit keeps its pixels and its patches; only the grid around it
  grows, so this asks whether the encoding works at grid positions and extents it never saw.
- resampled (`"resampled"`): the test canvas of the training size (the same offsets) is
  resized to each size by bilinear interpolation (`jax.image.resize`, half-pixel centres, as
  `F.interpolate(mode="bilinear", align_corners=False)`), the usual test of a ViT at a higher
  resolution (Touvron et al. 2019, "Fixing the train-test resolution discrepancy"). Caveat:
  the digits are 8 x 8 pixels, so resampling changes what a 2 x 2 patch sees (a stroke two
  pixels wide becomes four), and the accuracy then also measures the patch embedding's
  robustness to blur and scale, not the encoding alone.

At the training size both protocols score the same images. Data (`VisionConfig.data`):

- None: scikit-learn's bundled digits (`sklearn.datasets.load_digits`: 1,797 8 x 8 grayscale
  images of 10 classes, pixel values 0-16, scaled to [0, 1]), split by a fixed stratified
  split (`test_fraction`, seed 0) so every run scores the same images;
- a folder with one subfolder per class of images (read with Pillow, all of one size, scaled
  to [0, 1]; grayscale if every image is, RGB otherwise), split the same way.

The encodings users know by their 1-D names select their 2-D forms here (`PE_NAMES`:
`sinusoidal` -> `sinusoidal-2d`, ...): the only place the lab maps names.

Outputs in `workdir`: `config.json`, `metrics.jsonl`, Orbax checkpoints (run again and it
resumes) and `eval.json`:

    {"pe": ..., "encoding": registered name, "train_size": "12x12",
     "accuracy": {"12x12": ..., "16x16": ...}, "resampled": {...}}

with the training size first.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jpe.encodings import _checks
from jpe.lab import core, report
from jpe.nn.config import TransformerConfig
from jpe.nn.vision import VisionTransformer

__all__ = [
    "PE_NAMES",
    "ImageData",
    "VisionConfig",
    "evaluate_vit",
    "load_digits",
    "load_image_folder",
    "place_on_canvas",
    "predictor",
    "random_offsets",
    "resample",
    "run_vision_lab",
    "train_vit",
]

#: `--pe` on images: the name users know -> the registered 2-D encoding.
PE_NAMES = {
    "none": "none",
    "sinusoidal": "sinusoidal-2d",
    "learned": "learned-2d",
    "rope": "rope-2d",
    "rope-mixed": "rope-mixed",
    "alibi": "alibi-2d",
}
_IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm"}


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """One ViT run: encoding, model, budget, data and evaluation.

    Attributes:
      pe: the encoding: none, sinusoidal, learned, rope, rope-mixed or alibi (their 2-D
        forms), or a registered 2-D name (sinusoidal-2d, learned-2d, rope-2d, alibi-2d).
      pe_options: the encoding's options (JSON), e.g. '{"distance": "manhattan"}' for alibi.
      d_model, num_layers, num_heads: the encoder's sizes.
      patch_size: pixels a patch side; image and canvas sides must divide by it.
      train_size: the training canvas side in pixels (>= the image side).
      eval_sizes: canvas sides scored at test, comma-separated (the training size is added).
      steps, batch_size: optimisation steps and images per step.
      lr, warmup, weight_decay, clip: as `jpe.lab.core.make_optimizer` (warm-up default: 10%
        of `steps`).
      seed: seeds the parameters, the batches and the test offsets.
      data: None for scikit-learn's digits, or a folder with one subfolder per class.
      test_fraction: the held-out share of each class (stratified split, seed 0).
      eval_limit: score only the first this many held-out images (quick checks); None: all.
      checkpoint_every, keep: checkpoint interval in steps and how many to keep.
      log_every: steps between loss checks and metrics lines.
    """

    pe: str = "sinusoidal"
    pe_options: Mapping | None = None
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    patch_size: int = 2
    train_size: int = 12
    eval_sizes: tuple[int, ...] = (12, 16, 24, 32)
    steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int | None = None
    weight_decay: float = 0.05
    clip: float = 1.0
    seed: int = 0
    data: str | None = None
    test_fraction: float = 0.25
    eval_limit: int | None = None
    checkpoint_every: int = 500
    keep: int = 2
    log_every: int = 50

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        allowed = (*PE_NAMES, *dict.fromkeys(PE_NAMES.values()))
        _checks.one_of("pe", self.pe, tuple(dict.fromkeys(allowed)))
        for name in ("d_model", "num_layers", "num_heads", "patch_size", "train_size", "steps",
                     "batch_size", "checkpoint_every", "keep", "log_every"):  # fmt: skip
            _checks.positive_int(name, getattr(self, name))
        _checks.positive_int("seed", self.seed, minimum=0)
        _checks.positive_float("lr", self.lr)
        _checks.positive_float("weight_decay", self.weight_decay, allow_zero=True)
        _checks.positive_float("clip", self.clip)
        if self.warmup is None:
            set_("warmup", max(1, self.steps // 10))
        _checks.positive_int("warmup", self.warmup, minimum=0)
        if self.eval_limit is not None:
            _checks.positive_int("eval_limit", self.eval_limit)
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        sizes = self.eval_sizes
        if isinstance(sizes, int | np.integer):
            sizes = (sizes,)
        sizes = tuple(_checks.positive_int("eval_sizes", s) for s in sizes)
        sizes = tuple(dict.fromkeys((self.train_size, *sorted(sizes))))  # training size first
        set_("eval_sizes", sizes)
        for name, side in [("train_size", self.train_size)] + [("eval_sizes", s) for s in sizes]:
            if side % self.patch_size:
                raise ValueError(
                    f"{name}: {side} pixels do not divide into patches of {self.patch_size}; "
                    "use a multiple of patch_size"
                )
        if min(sizes) < self.train_size:
            raise ValueError(
                f"eval_sizes must be >= train_size ({self.train_size}), got {min(sizes)}"
            )
        if self.data is not None:
            set_("data", str(Path(self.data)))
        self.model_config(num_classes=2)  # checks the encoding's options against the sizes

    @property
    def encoding(self) -> str:
        """The registered name of the 2-D encoding `pe` selects."""
        return PE_NAMES.get(self.pe, self.pe)

    def model_config(self, *, num_classes: int) -> TransformerConfig:
        """The encoder. `max_len` is the training grid's side: the rows and columns of
        `learned-2d`'s table (other encodings hold no table)."""
        return TransformerConfig(
            pe=self.encoding,
            pe_options=self.pe_options,
            d_model=self.d_model,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            causal=False,
            max_len=self.train_size // self.patch_size,
            num_classes=num_classes,
        )

    def replace(self, **changes) -> VisionConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict:
        return core.config_json(self)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class ImageData:
    """Images `[N, S, S, C]` float32 in [0, 1] with int32 labels `[N]`, split in two.

    Attributes:
      train_images, train_labels, test_images, test_labels: the split.
      classes: the class names, indexed by label.
      name: where the images came from.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: tuple[str, ...]
    name: str

    @property
    def side(self) -> int:
        return self.train_images.shape[1]

    @property
    def channels(self) -> int:
        return self.train_images.shape[3]


def _split(images, labels, classes, name, test_fraction) -> ImageData:
    from sklearn.model_selection import train_test_split

    try:
        a, b, y_a, y_b = train_test_split(
            images, labels, test_size=test_fraction, stratify=labels, random_state=0
        )
    except ValueError as error:  # too few images for a stratified split
        raise ValueError(
            f"data: cannot split the {len(labels)} images of {name} ({len(classes)} classes) "
            f"with test_fraction {test_fraction}: {error}"
        ) from None
    return ImageData(a, y_a.astype(np.int32), b, y_b.astype(np.int32), tuple(classes), name)


def load_digits(test_fraction: float = 0.25) -> ImageData:
    """scikit-learn's bundled digits (no download): 1,797 8 x 8 images of 10 classes, scaled
    from 0-16 to [0, 1], with a fixed stratified split."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]  # [N, 8, 8, 1]
    classes = [str(c) for c in digits.target_names]
    return _split(images, digits.target, classes, "sklearn digits", test_fraction)


def load_image_folder(path: str | os.PathLike, test_fraction: float = 0.25) -> ImageData:
    """Square images in `path/<class>/<image>`, one subfolder per class, with a fixed
    stratified split.

    Raises:
      ValueError: naming the folder or file: a missing folder, fewer than two class
        subfolders, a class with no images (or too few to split), an unreadable image, an
        image that is not square or not of the first image's size.
    """
    from PIL import Image, UnidentifiedImageError

    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"data: {str(root)!r} is not a folder (one subfolder per class)")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(class_dirs) < 2:
        raise ValueError(
            f"data: {str(root)!r} must hold one subfolder per class (at least 2), found "
            f"{len(class_dirs)}"
        )
    pictures, labels, size = [], [], None
    for label, folder in enumerate(class_dirs):
        files = sorted(
            p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_EXTENSIONS
        )
        if len(files) < 2:
            raise ValueError(
                f"data: class folder {str(folder)!r} holds {len(files)} image(s); each class "
                f"needs at least 2 (extensions {', '.join(sorted(_IMAGE_EXTENSIONS))})"
            )
        for file in files:
            try:
                with Image.open(file) as image:
                    image.load()
                    picture = image.copy()
            except (UnidentifiedImageError, OSError) as error:
                raise ValueError(f"data: cannot read image {str(file)!r}: {error}") from None
            if picture.size[0] != picture.size[1]:
                raise ValueError(
                    f"data: image {str(file)!r} is {picture.size[0]}x{picture.size[1]} pixels; "
                    "images must be square"
                )
            if size is None:
                size = picture.size
            elif picture.size != size:
                raise ValueError(
                    f"data: image {str(file)!r} is {picture.size[0]}x{picture.size[1]} pixels, "
                    f"but the first image is {size[0]}x{size[1]}; all images must be one size"
                )
            pictures.append(picture)
            labels.append(label)
    gray = all(p.mode in ("1", "L", "I;16") for p in pictures)
    mode = "L" if gray else "RGB"
    images = np.stack([np.asarray(p.convert(mode), np.float32) / 255.0 for p in pictures])
    if gray:
        images = images[..., None]
    classes = [d.name for d in class_dirs]
    return _split(images, np.asarray(labels), classes, str(root), test_fraction)


def load_data(config: VisionConfig) -> ImageData:
    """`config.data`'s images, checked against the patch and canvas sizes."""
    if config.data is None:
        data = load_digits(config.test_fraction)
    else:
        data = load_image_folder(config.data, config.test_fraction)
    if data.side > config.train_size:
        raise ValueError(
            f"train_size: the images of {data.name} are {data.side}x{data.side} pixels, larger "
            f"than the training canvas of {config.train_size}; raise train_size"
        )
    return data


def random_offsets(
    rng: np.random.Generator, count: int, side: int, canvas: int, patch_size: int
) -> np.ndarray:
    """`[count, 2]` (row, column) pixel offsets, multiples of `patch_size`, that fit an image of
    `side` pixels on a `canvas` (uniform over the patch-aligned places)."""
    places = (canvas - side) // patch_size + 1
    return rng.integers(0, places, size=(count, 2)) * patch_size


def place_on_canvas(images: np.ndarray, canvas: int, offsets: np.ndarray) -> np.ndarray:
    """Images `[N, S, S, C]` on blank (zero) canvases `[N, canvas, canvas, C]`, each at its
    (row, column) offset `[N, 2]`."""
    n, side, _, channels = images.shape
    out = np.zeros((n, canvas, canvas, channels), np.float32)
    rows = offsets[:, 0, None] + np.arange(side)[None]  # [N, S]
    cols = offsets[:, 1, None] + np.arange(side)[None]
    out[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]] = images
    return out


def resample(images: np.ndarray, size: int) -> np.ndarray:
    """Images `[N, S, S, C]` resized to `size` x `size` by bilinear interpolation
    (`jax.image.resize`, half-pixel centres, antialiased when shrinking)."""
    n, _, _, channels = images.shape
    out = jax.image.resize(jnp.asarray(images), (n, size, size, channels), "linear")
    return np.asarray(out, np.float32)


def _test_canvases(data: ImageData, config: VisionConfig) -> dict[str, dict[int, np.ndarray]]:
    """The test images of each protocol at each size (offsets fixed by the seed)."""
    rng = np.random.default_rng([config.seed, 1 << 20])  # apart from the training batches
    out = {"accuracy": {}, "resampled": {}}
    images = data.test_images[: config.eval_limit]
    for size in config.eval_sizes:
        offsets = random_offsets(rng, len(images), data.side, size, config.patch_size)
        out["accuracy"][size] = place_on_canvas(images, size, offsets)
    base = out["accuracy"][config.train_size]
    for size in config.eval_sizes:
        out["resampled"][size] = base if size == config.train_size else resample(base, size)
    return out


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------

_EVAL_PATCHES = 1 << 14  # patches per evaluation batch


def evaluate_vit(
    model: VisionTransformer, images: np.ndarray, labels: np.ndarray, *, predict=None
) -> float:
    """Top-1 accuracy of `model` on `images` `[N, H, W, C]`, in batches of one shape.

    `predict`, from `predictor(model)`, saves splitting the model again on every call; either
    way the executable is compiled once per (model configuration, image shape) in a process
    and reused by every model of that configuration (`core.model_jit`,
    `core.run_compiled`)."""
    state, predict = predictor(model) if predict is None else predict
    n = len(images)
    patches = (images.shape[1] // model.patch_size) * (images.shape[2] // model.patch_size)
    per_batch = max(1, min(n, _EVAL_PATCHES // patches))
    correct = 0
    for start in range(0, n, per_batch):
        index = np.arange(start, start + per_batch) % n  # the last batch wraps: one shape
        predicted = np.asarray(core.run_compiled(predict, state, images[index]))
        predicted = predicted[: min(per_batch, n - start)]
        correct += int(np.sum(predicted == labels[start : start + per_batch]))
    return correct / n


def _argmax_classes(model: VisionTransformer, images):
    """The argmax class `[B]` of images `[B, H, W, C]`."""
    return jnp.argmax(model(images), axis=-1)


def predictor(model: VisionTransformer):
    """`(state, predict)`: the model's state (`nnx.split`) and a jitted `predict(state,
    images)` of its argmax classes, for `evaluate_vit`. `predict` is made once per model
    configuration (`core.model_jit`, keyed on the graph definition), so models of one
    configuration share it and its compilations."""
    graphdef, state = nnx.split(model)
    return state, core.model_jit(_argmax_classes, graphdef)


def _size_name(size: int) -> str:
    return f"{size}x{size}"


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

# Fields that change only what is done around training, so a run may resume with others.
_RESUMABLE = {"checkpoint_every", "keep", "log_every", "eval_sizes", "eval_limit"}


def _loss(model, batch, positions):
    """Cross-entropy of the image logits (`core.weighted_nll`, every image weighted 1)."""
    return core.weighted_nll(model(batch["inputs"]), batch["targets"], batch["weights"])


def train_vit(
    config: VisionConfig, workdir: str | os.PathLike, *, progress: bool = True, data=None
) -> dict:
    """Trains (or resumes) a ViT in `workdir`, then scores it at every size and protocol.

    Args:
      config: the run.
      workdir: checkpoints, metrics and `eval.json`.
      progress: show a progress bar.
      data: an `ImageData` to use instead of loading `config.data` (the lab loads once).

    Returns:
      `{"start_step", "losses", "eval": the eval.json report, "model", "train_seconds"}`.

    Raises:
      ValueError: `config` not a `VisionConfig`, bad data (naming the file), or a workdir
        holding a run of another configuration.
      NonFiniteLossError: the loss became NaN or infinite (the last good checkpoint stays).
    """
    if not isinstance(config, VisionConfig):
        raise ValueError(f"config must be a jpe.lab.vision.VisionConfig, got {type(config)}")
    c, workdir = config, Path(workdir)
    data = load_data(c) if data is None else data
    model = VisionTransformer(
        c.model_config(num_classes=len(data.classes)),
        patch_size=c.patch_size,
        channels=data.channels,
        rngs=nnx.Rngs(c.seed),
    )
    tx, schedule = core.make_optimizer(
        lr=c.lr, steps=c.steps, warmup=c.warmup, weight_decay=c.weight_decay, clip=c.clip
    )
    state = core.init_state(model, tx, loss_fn=_loss)
    weights = np.ones((c.batch_size,), np.float32)

    def batch_at(step: int) -> dict:
        # a pure function of (seed, step), so a resumed run sees the batches it would have
        rng = np.random.default_rng([c.seed, step])
        index = rng.integers(0, len(data.train_images), c.batch_size)
        offsets = random_offsets(rng, c.batch_size, data.side, c.train_size, c.patch_size)
        images = place_on_canvas(data.train_images[index], c.train_size, offsets)
        return {"inputs": images, "targets": data.train_labels[index], "weights": weights}

    workdir.mkdir(parents=True, exist_ok=True)
    checkpoints = core.Checkpoints(workdir, c.to_json(), keep=c.keep, resumable=_RESUMABLE)
    metrics_path = workdir / "metrics.jsonl"
    state, start, _ = core.resume(state, checkpoints, metrics_path)
    began = time.perf_counter()
    try:
        params, _, records = core.fit(
            state,
            batch_at,
            steps=c.steps,
            start=start,
            schedule=schedule,
            log_every=c.log_every,
            checkpoints=checkpoints,
            checkpoint_every=c.checkpoint_every,
            checkpoint_meta=lambda step: {},
            metrics_path=metrics_path,
            progress=progress,
            desc=f"vit/{c.pe}",
        )
    finally:
        checkpoints.close()
    train_seconds = time.perf_counter() - began
    model = state.build(params)
    report_ = {
        "pe": c.pe,
        "encoding": c.encoding,
        "data": data.name,
        "train_size": _size_name(c.train_size),
        "patch_size": c.patch_size,
        "accuracy": {},
        "resampled": {},
    }
    predict = predictor(model)
    labels = data.test_labels[: c.eval_limit]
    for protocol, by_size in _test_canvases(data, c).items():
        for size, images in by_size.items():
            accuracy = evaluate_vit(model, images, labels, predict=predict)
            report_[protocol][_size_name(size)] = accuracy
    if jax.process_index() == 0:
        (workdir / "eval.json").write_text(json.dumps(report_, indent=1))
    return {
        "start_step": start,
        "losses": records,
        "eval": report_,
        "model": model,
        "train_seconds": train_seconds,
    }


# ---------------------------------------------------------------------------------------------
# The lab: every encoding, one budget, a few seeds
# ---------------------------------------------------------------------------------------------


def report_spec(config: VisionConfig, seconds: float, seeds: Sequence[int]) -> report.ReportSpec:
    """How the vision lab's details are written (`jpe.lab.report`)."""
    summary = (
        f"ViT ({config.num_layers} layers, d_model {config.d_model}, {config.num_heads} heads, "
        f"{config.patch_size}x{config.patch_size} patches, mean pooling) trained for "
        f"{config.steps} steps (batch {config.batch_size}) on {config.train_size}x"
        f"{config.train_size} canvases, seeds {', '.join(map(str, seeds))}; top-1 accuracy on "
        f"the held-out images at each canvas size. Wall time {seconds:.0f} s on "
        f"{report.machine()}."
    )
    return report.ReportSpec(
        metrics=(
            report.Metric(
                "accuracy", "Canvas: digit at a random offset on a blank canvas", "top-1 accuracy"
            ),
            report.Metric(
                "resampled", "Resampled: training canvas resized (bilinear)", "top-1 accuracy"
            ),
        ),  # fmt: skip
        summary=summary,
        column=lambda n: f"{n}x{n}",
        x_label="test canvas side (pixels)",
        train_size=(config.train_size, f"training size {config.train_size}"),
        figure="vision.png",
        title="ViT accuracy against test image size",
        y_range=(0.0, 1.0),
    )


def run_vision_lab(
    config: VisionConfig,
    pes: Sequence[str],
    seeds: Sequence[int],
    workdir: str | os.PathLike,
    *,
    progress: bool = True,
) -> dict:
    """Trains `config` with each encoding of `pes` and each seed (in `workdir/PE-sSEED`, each
    resumable), then writes `results.json`, `details.json`, `results.md` and `vision.png`
    (`jpe.lab.report`). Returns the details dict."""
    if not pes:
        raise ValueError("pes must name at least one encoding")
    seeds = [_checks.positive_int("seeds", s, minimum=0) for s in seeds]
    if not seeds:
        raise ValueError("seeds must hold at least one seed")
    for pe in pes:
        config.replace(pe=pe)  # every name checked before any training
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data = load_data(config)
    began = time.perf_counter()
    runs = {}
    for pe in pes:
        runs[pe] = {}
        for seed in seeds:
            run = config.replace(pe=pe, seed=seed)
            result = train_vit(run, workdir / f"{pe}-s{seed}", progress=progress, data=data)
            ev = result["eval"]
            runs[pe][str(seed)] = {
                key: {name.split("x")[0]: value for name, value in ev[key].items()}
                for key in ("accuracy", "resampled")
            }
            runs[pe][str(seed)]["train_seconds"] = round(result["train_seconds"], 1)
    seconds = time.perf_counter() - began
    cfg = {**config.to_json(), "pes": list(pes), "seeds": list(seeds)}
    details = report.details(cfg, runs, seconds)
    report.write(details, workdir, report_spec(config, seconds, seeds))
    return details
