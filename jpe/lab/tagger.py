"""Encoder fine-tuning for token classification, and how far its encoding extrapolates.

`train_tagger(TagConfig(...), workdir)` trains a bidirectional `jpe.Transformer` encoder with a
token-classification head (`TransformerConfig(causal=False, num_classes=labels.size)`) on the
lab's training core (`jpe.lab.core`: AdamW, the weighted cross-entropy, checkpoints, the loop),
then scores entity-level precision, recall and F1 (`jpe.lab.tagging.evaluate`, seqeval's
default and strict modes) on windows of the training length and of 2x, 4x and 8x that length:
the length-extrapolation question asked of an encoder, which sees the whole window at once.

Data (`TagConfig.data`):
- None: the built-in corpus, span tagging of the standard library's Python source
  (`tagging.load_python_source`), one position per character.
- a CoNLL-2003 file (Tjong Kim Sang & De Meulder 2003) for training, one position per word
  (`tagging.WordVocabulary`). Its validation and test files are found next to it by name:
  the training file's name with `train` replaced by, in order, `valid`, `dev`, `testa` (the
  validation file) or `test`, `testb` (the test file): `train.txt` / `valid.txt` /
  `test.txt` (Hugging Face's copy) and `eng.train` / `eng.testa` / `eng.testb` (the original
  files) both work. `eval_split` chooses which one is scored.

Training rows (`TagConfig.pack`):
- windows (default): each document cut into windows of `seq_len` tokens, positions
  0..seq_len-1 (`tagging.document_windows`); a batch is `batch_size` windows drawn at random
  as a pure function of (seed, step), so a resumed run sees the batches an uninterrupted one
  would.
- packed: sentences packed into rows of `seq_len` (`tagging.pack_sentences`) with segment ids,
  so no sentence attends to another, and explicit positions that restart at each sentence
  (BERT's `position_ids`, Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional
  Transformers for Language Understanding") or continue across the row (`positions`).
  A packed run is also scored on packed validation rows with the same positions.

Every batch is `{"inputs", "targets", "weights", "segment_ids", "positions"}` `[B, L]`, the
names `core.model_loss` reads (`targets` are the label ids).

Outputs in `workdir`: `config.json`, `metrics.jsonl`, Orbax checkpoints (run again and it
resumes), and `eval.json`:

    {"pe": ..., "seq_len": L, "f1": {"<window>": micro F1, default mode}, "f1_strict": {...},
     "per_type": {"<window>": {type: F1, default mode}}[, "f1_packed": {...}], ...}
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jpe.encodings import _checks
from jpe.lab import core, tagging
from jpe.nn.config import TransformerConfig
from jpe.nn.registry import encoding_class
from jpe.nn.transformer import Transformer

__all__ = ["TagConfig", "TagData", "evaluate_tagger", "load_tag_data", "train_tagger"]

_POSITIONS = ("restart", "continue")
_SPLITS = ("validation", "test")
# Names that replace "train" in a CoNLL training file's name, tried in order.
_SIBLINGS = {"validation": ("valid", "dev", "testa"), "test": ("test", "testb")}


@dataclasses.dataclass(frozen=True)
class TagConfig:
    """One token-classification run: encoding, model, budget, data and evaluation.

    Attributes:
      pe, pe_options: the encoding (one of `jpe.ENCODINGS`) and its options.
      d_model, num_layers, num_heads: the encoder's sizes.
      max_len: `TransformerConfig.max_len`; defaults to the longest position the run uses
        (the longest eval window), and a bounded encoding (`learned`) with a smaller one is
        an error.
      seq_len: L, the training window (or packed row) length in tokens.
      steps, batch_size: optimisation steps and rows per step.
      lr, warmup, weight_decay, clip: as `jpe.lab.core.make_optimizer` (warm-up default: 10%
        of `steps`).
      seed: seeds the parameters and the batches.
      data: None for the built-in Python-source corpus, or a CoNLL training file (validation
        and test files next to it, `train` in its name replaced by valid/dev/testa and
        test/testb).
      eval_split: the split scored, "validation" or "test".
      eval_multiples: the eval windows, as multiples of seq_len (default 1, 2, 4, 8).
      pack: train on sentences packed into rows instead of document windows.
      positions: for packed rows, "restart" (at each sentence) or "continue" (across the row).
      checkpoint_every, keep: checkpoint interval in steps and how many to keep.
      log_every: steps between loss checks and metrics lines.
    """

    pe: str = "rope"
    pe_options: Mapping | None = None
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    max_len: int | None = None
    seq_len: int = 64
    steps: int = 400
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int | None = None
    weight_decay: float = 0.01
    clip: float = 1.0
    seed: int = 0
    data: str | None = None
    eval_split: str = "validation"
    eval_multiples: tuple[int, ...] = (1, 2, 4, 8)
    pack: bool = False
    positions: str = "restart"
    checkpoint_every: int = 200
    keep: int = 2
    log_every: int = 25

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        encoding_class(self.pe)
        for name in ("d_model", "num_layers", "num_heads", "seq_len", "steps", "batch_size",
                     "checkpoint_every", "keep", "log_every"):  # fmt: skip
            _checks.positive_int(name, getattr(self, name))
        _checks.positive_int("seed", self.seed, minimum=0)
        _checks.positive_float("lr", self.lr)
        _checks.positive_float("weight_decay", self.weight_decay, allow_zero=True)
        _checks.positive_float("clip", self.clip)
        if self.warmup is None:
            set_("warmup", max(1, self.steps // 10))
        _checks.positive_int("warmup", self.warmup, minimum=0)
        _checks.one_of("eval_split", self.eval_split, _SPLITS)
        _checks.one_of("positions", self.positions, _POSITIONS)
        multiples = self.eval_multiples
        if isinstance(multiples, int | np.integer):
            multiples = (multiples,)
        if not multiples:
            raise ValueError("eval_multiples must hold at least one positive integer")
        set_("eval_multiples", tuple(_checks.positive_int("eval_multiples", m) for m in multiples))
        if self.data is not None:
            path = Path(self.data)
            if not path.is_file():
                raise ValueError(f"data: {str(path)!r} is not a file (a CoNLL training file)")
            set_("data", str(path))
        if self.max_len is None:
            set_("max_len", self.longest_position)
        _checks.positive_int("max_len", self.max_len)
        model = self.model_config(vocab_size=256, num_classes=1)  # also checks the options
        limit = model.encoding.position_limit(model)
        if limit is not None and limit < self.longest_position:
            raise ValueError(
                f"max_len: pe={self.pe!r} holds {limit} positions, but the longest eval window "
                f"is {self.longest_position} tokens ({max(self.eval_multiples)} x seq_len "
                f"{self.seq_len}): raise max_len or drop the longer eval_multiples"
            )

    @property
    def windows(self) -> tuple[int, ...]:
        """The eval window lengths, `seq_len` times each of `eval_multiples`."""
        return tuple(m * self.seq_len for m in self.eval_multiples)

    @property
    def longest_position(self) -> int:
        """Positions this run uses: [0, longest_position)."""
        return max((self.seq_len, *self.windows))

    def model_config(self, *, vocab_size: int, num_classes: int) -> TransformerConfig:
        """The encoder: bidirectional, with a `num_classes`-way token-classification head."""
        return TransformerConfig(
            pe=self.pe,
            pe_options=self.pe_options,
            vocab_size=vocab_size,
            d_model=self.d_model,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            causal=False,
            max_len=self.max_len,
            num_classes=num_classes,
        )

    def replace(self, **changes) -> TagConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict:
        return core.config_json(self)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class TagData:
    """A run's documents and vocabularies.

    Attributes:
      train, eval: the training documents and those of the scored split.
      vocab: `tagging.CHARACTERS` or a `tagging.WordVocabulary`.
      labels: the `tagging.LabelVocabulary` of the training documents.
      eval_name: where the scored documents came from (a file, or the built-in split).
    """

    train: list
    eval: list
    vocab: object
    labels: tagging.LabelVocabulary
    eval_name: str


def _sibling(train: Path, split: str) -> Path:
    if "train" not in train.name:
        raise ValueError(
            f"data: the file name {train.name!r} must contain 'train' to find its {split} file "
            f"next to it (train -> {' or '.join(_SIBLINGS[split])})"
        )
    tried = [train.with_name(train.name.replace("train", n)) for n in _SIBLINGS[split]]
    for path in tried:
        if path.is_file():
            return path
    raise ValueError(
        f"data: no {split} file next to {str(train)!r}; looked for "
        + ", ".join(repr(p.name) for p in tried)
    )


def load_tag_data(config: TagConfig) -> TagData:
    """The documents and vocabularies of `config.data` (see the module docstring).

    Raises:
      ValueError: a missing or malformed file (naming it), or an eval tag whose type the
        training file does not hold.
    """
    if config.data is None:
        corpus = tagging.load_python_source()
        train, scored = corpus.train, getattr(corpus, config.eval_split)
        vocab, name = tagging.CHARACTERS, f"built-in {config.eval_split} split"
    else:
        path = Path(config.data)
        scored_path = _sibling(path, config.eval_split)
        train, scored = tagging.read_conll(path), tagging.read_conll(scored_path)
        vocab, name = tagging.WordVocabulary.build(train), str(scored_path)
    return TagData(train, scored, vocab, tagging.LabelVocabulary.build(train), name)


def _batch(rows: Mapping[str, np.ndarray], index: np.ndarray) -> dict:
    """The rows `index` of `tagging`'s arrays, with `labels` renamed to `targets`."""
    names = {"inputs": "inputs", "labels": "targets", "weights": "weights",
             "segment_ids": "segment_ids", "positions": "positions"}  # fmt: skip
    return {new: rows[old][index] for old, new in names.items()}


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------

_EVAL_TOKENS = 1 << 14  # tokens per evaluation batch


def _label_ids(model: Transformer, inputs, positions, segment_ids):
    """Argmax label ids `[B, L]` of `model` over one batch of rows `[B, L]`."""
    logits = model(inputs, positions=positions, segment_ids=segment_ids)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def _predict(model: Transformer, rows: Mapping[str, np.ndarray]) -> np.ndarray:
    """Argmax label ids `[N, L]` of the model over `rows`, in batches of fixed shape, with one
    executable per (model configuration, batch shape) in a process, shared by every model of
    that configuration (`core.model_jit`, `core.run_compiled`)."""
    n, length = rows["inputs"].shape
    per_batch = max(1, _EVAL_TOKENS // length)
    graphdef, state = nnx.split(model)
    predict = core.model_jit(_label_ids, graphdef)
    out = []
    for start in range(0, n, per_batch):
        index = np.arange(start, start + per_batch) % n  # the last batch wraps: one shape
        batch = _batch(rows, index)
        ids = core.run_compiled(
            predict, state, batch["inputs"], batch["positions"], batch["segment_ids"]
        )
        out.append(np.asarray(ids)[: min(per_batch, n - start)])
    return np.concatenate(out)


def evaluate_tagger(model: Transformer, rows: Mapping[str, np.ndarray], labels) -> dict:
    """`tagging.evaluate`'s scores of `model` on `rows` (`tagging.document_windows` or
    `pack_sentences` output, `[N, L]` arrays), with the row's own positions and segments."""
    predicted = _predict(model, rows)
    return tagging.evaluate(
        rows["labels"],
        predicted,
        labels=labels,
        weights=rows["weights"],
        segment_ids=rows["segment_ids"],
    )


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

# Fields that change only what is done around training, so a run may resume with others.
_RESUMABLE = {"checkpoint_every", "keep", "log_every", "eval_multiples", "eval_split"}


def train_tagger(config: TagConfig, workdir: str | os.PathLike, *, progress: bool = True) -> dict:
    """Trains (or resumes) an encoder tagger in `workdir`, then scores it at every window.

    Returns:
      `{"start_step": the step this call began at (> 0 when it resumed), "losses": this
      call's metrics records, "eval": the eval.json report, "model": the trained
      Transformer, "train_seconds": float}`.

    Raises:
      ValueError: `config` not a `TagConfig`, bad data, or a workdir holding a run of
        another configuration.
      NonFiniteLossError: the loss became NaN or infinite (the last good checkpoint stays).
    """
    if not isinstance(config, TagConfig):
        raise ValueError(f"config must be a jpe.lab.tagger.TagConfig, got {type(config).__name__}")
    c, workdir = config, Path(workdir)
    data = load_tag_data(c)
    encode = dict(vocab=data.vocab, labels=data.labels)
    if c.pack:
        rows = tagging.pack_sentences(data.train, c.seq_len, positions=c.positions, **encode)
    else:
        rows = tagging.document_windows(data.train, c.seq_len, **encode)
    model_config = c.model_config(vocab_size=data.vocab.size, num_classes=data.labels.size)

    tx, schedule = core.make_optimizer(
        lr=c.lr, steps=c.steps, warmup=c.warmup, weight_decay=c.weight_decay, clip=c.clip
    )
    state = core.init_state(Transformer(model_config, rngs=nnx.Rngs(c.seed)), tx)

    def batch_at(step: int) -> dict:
        rng = np.random.default_rng([c.seed, step])
        return _batch(rows, rng.integers(0, len(rows["inputs"]), c.batch_size))

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
            tokens_per_step=c.batch_size * c.seq_len,
            checkpoints=checkpoints,
            checkpoint_every=c.checkpoint_every,
            checkpoint_meta=lambda step: {},
            metrics_path=metrics_path,
            progress=progress,
            desc=f"tag/{c.pe}",
        )
    finally:
        checkpoints.close()
    train_seconds = time.perf_counter() - began

    model = state.build(params)
    report = {"pe": c.pe, "seq_len": c.seq_len, "pack": c.pack, "eval": data.eval_name,
              "f1": {}, "f1_strict": {}, "per_type": {}}  # fmt: skip
    if c.pack:
        report["positions"] = c.positions
    for window in c.windows:
        scores = evaluate_tagger(
            model, tagging.document_windows(data.eval, window, **encode), data.labels
        )
        report["f1"][str(window)] = scores["default"]["f1"]
        report["f1_strict"][str(window)] = scores["strict"]["f1"]
        report["per_type"][str(window)] = {
            kind: s["f1"] for kind, s in scores["default"]["per_type"].items()
        }
    if c.pack:
        packed = tagging.pack_sentences(data.eval, c.seq_len, positions=c.positions, **encode)
        scores = evaluate_tagger(model, packed, data.labels)
        report["f1_packed"] = {"default": scores["default"]["f1"], "strict": scores["strict"]["f1"]}
    if jax.process_index() == 0:
        (workdir / "eval.json").write_text(json.dumps(report, indent=1))
    return {
        "start_step": start,
        "losses": records,
        "eval": report,
        "model": model,
        "train_seconds": train_seconds,
    }
