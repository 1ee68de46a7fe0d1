"""Byte-level data: the built-in corpus, a train/validation split, batches, evaluation windows.

Tokens are the UTF-8 bytes of the text (a vocabulary of 256), so nothing is downloaded and no
tokenizer is trained. Everything here runs in NumPy on the host and returns NumPy arrays; the
training step puts them on devices.

Documents are concatenated, each followed by the byte `DOC_END` (0xFF). That byte never occurs
in UTF-8 text, so it marks the end of a document unambiguously, as an end-of-text token would;
`decode` shows it as U+FFFD.

Example:
  >>> corpus = load_corpus()  # the built-in corpus: Python's documentation text
  >>> batches = Batches(corpus.train, batch_size=8, seq_len=128, seed=0)
  >>> batch = batches.batch(0)  # {"inputs", "targets", "weights"}, each [8, 128]
  >>> windows = eval_windows(corpus.val, 512)  # every validation target scored once
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from jpe.encodings import _checks

__all__ = [
    "DOC_END",
    "VOCAB_SIZE",
    "Batches",
    "Corpus",
    "decode",
    "encode",
    "eval_windows",
    "load_corpus",
    "load_text",
    "split_documents",
]

#: the number of distinct tokens: one per byte value
VOCAB_SIZE = 256
#: the byte after every document; 0xFF is never part of UTF-8 text
DOC_END = 0xFF

_DATA_FORMS = "None (the built-in corpus), a text file, a folder of text files, or hf:NAME[:CONFIG]"


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------


def load_text(data: str | os.PathLike | None = None) -> list[str]:
    """Documents of text, from the built-in corpus, a file, a folder or a Hugging Face data set.

    - `None`: the built-in corpus, the English text of Python's own documentation
      (`pydoc_data.topics`, shipped with every CPython): one document per topic, in sorted
      topic order. On CPython 3.11.7 that is 79 documents and 466,117 bytes of UTF-8 (almost
      all ASCII; a few hundred curly quotes and dashes); other Python versions differ slightly.
    - a text file: one document.
    - a folder: every regular file under it, recursively, sorted by relative path, one document
      each. Hidden files and folders (names starting with ".") are skipped, and so are files
      that are empty or hold only whitespace.
    - `"hf:NAME[:CONFIG]"`: the `text` column of the `train` split of a Hugging Face data set,
      one document per non-blank row. This needs the optional `datasets` package and a data set
      already in the local cache: `HF_DATASETS_OFFLINE` and `HF_HUB_OFFLINE` are set to 1 for
      the rest of the process, so nothing is downloaded.

    Files are read as UTF-8.

    Args:
      data: one of the forms above.

    Returns:
      The documents, each a non-empty string.

    Raises:
      ValueError: the path does not exist; the file is empty or only whitespace; the folder
        holds no non-empty files; a file is not UTF-8 (the message names the file and the
        byte offset of the first bad byte); `datasets` is missing or the data set is not
        cached.
    """
    if data is None:
        from pydoc_data.topics import topics

        return [topics[name] for name in sorted(topics)]
    if isinstance(data, str) and data.startswith("hf:"):
        return _load_hf(data)
    if not isinstance(data, str | os.PathLike):
        raise ValueError(f"data must be {_DATA_FORMS}; got {data!r}")
    path = Path(data)
    if not path.exists():
        raise ValueError(f"data: {str(path)!r} does not exist; data must be {_DATA_FORMS}")
    if path.is_dir():
        files = _files_under(path)
        if not files:
            raise ValueError(
                f"data: the folder {str(path)!r} holds no files (hidden files and folders, "
                "whose names start with '.', are skipped)"
            )
        docs = [text for text in map(_read_utf8, files) if text.strip()]
        if not docs:
            raise ValueError(
                f"data: every file under {str(path)!r} is empty or holds only whitespace"
            )
        return docs
    if not path.is_file():
        raise ValueError(f"data: {str(path)!r} is neither a regular file nor a folder")
    text = _read_utf8(path)
    if not text.strip():
        what = "is empty" if not text else "holds only whitespace"
        raise ValueError(f"data: the file {str(path)!r} {what}")
    return [text]


def _files_under(root: Path) -> list[Path]:
    """Regular files under `root`, recursively, sorted by relative path, skipping hidden ones."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            path = Path(dirpath, name)
            if not name.startswith(".") and path.is_file():
                found.append(path)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _read_utf8(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"data: {str(path)!r} is not UTF-8 text: byte 0x{raw[e.start]:02x} at byte offset "
            f"{e.start} cannot be decoded ({e.reason})"
        ) from None


def _load_hf(spec: str) -> list[str]:
    """The `text` column of the train split of a cached Hugging Face data set."""
    name, _, config = spec.removeprefix("hf:").partition(":")
    config = config or None
    if not name:
        raise ValueError(
            f"data: {spec!r} names no data set; use hf:NAME or hf:NAME:CONFIG, e.g. "
            "hf:roneneldan/TinyStories or hf:wikitext:wikitext-103-raw-v1"
        )
    args = repr(name) + (f", {config!r}" if config else "")
    how = (
        "install and cache it once, with network access: pip install datasets && python -c "
        f"\"import datasets; datasets.load_dataset({args}, split='train')\""
    )
    # Set before `datasets` is imported (it reads them once), so that nothing is downloaded.
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"data: {spec!r} needs the optional `datasets` package, which is not installed; {how}"
        ) from None
    try:
        rows = datasets.load_dataset(name, config, split="train")
    except Exception as e:
        raise ValueError(
            f"data: could not load the Hugging Face data set {name!r} (config {config!r}) from "
            f"the local cache; nothing is downloaded here. To use it, {how}. "
            f"({type(e).__name__}: {e})"
        ) from e
    if "text" not in rows.column_names:
        raise ValueError(
            f"data: the Hugging Face data set {name!r} has no 'text' column; its columns are "
            f"{rows.column_names}"
        )
    docs = [text for text in rows["text"] if isinstance(text, str) and text.strip()]
    if not docs:
        raise ValueError(f"data: the 'text' column of {name!r} holds no non-blank rows")
    return docs


def encode(text: str) -> np.ndarray:
    """The UTF-8 bytes of `text` as tokens.

    Example:
      >>> encode("hé")
      array([104, 195, 169], dtype=uint8)

    Returns:
      uint8 `[num_bytes]`.
    """
    return np.frombuffer(bytearray(text.encode("utf-8")), np.uint8)


def decode(tokens) -> str:
    """The text of byte tokens; bytes that are not valid UTF-8 (such as `DOC_END`) become U+FFFD.

    Args:
      tokens: integers in [0, 256), any shape (flattened), e.g. a row of model samples.

    Raises:
      ValueError: if `tokens` is not an integer array or holds values outside [0, 256).
    """
    tokens = np.asarray(tokens)
    if tokens.size == 0:
        return ""
    return _as_bytes("tokens", tokens.reshape(-1)).tobytes().decode("utf-8", errors="replace")


def _as_bytes(name: str, tokens) -> np.ndarray:
    """`tokens` as a 1-D uint8 array, or raises naming `name`."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of bytes, got shape {tokens.shape}")
    if np.issubdtype(tokens.dtype, np.uint8):
        return tokens
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"{name} must have an integer dtype (bytes), got {tokens.dtype}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= VOCAB_SIZE):
        raise ValueError(
            f"{name} must hold values in [0, {VOCAB_SIZE}), got {tokens.min()} to {tokens.max()}"
        )
    return tokens.astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Train/validation split
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
    """Training and validation bytes, with where each document starts.

    Attributes:
      train: uint8 `[N_train]`, documents each followed by `DOC_END`.
      val: uint8 `[N_val]`, the bytes after `train`.
      train_doc_starts: int64 `[D_train]`, the offset in `train` where each document starts;
        begins with 0 and increases.
      val_doc_starts: int64 `[D_val]`, the same for `val`. It also begins with 0: when the
        split cuts through a document, the tail of that document counts as the first one.
    """

    train: np.ndarray
    val: np.ndarray
    train_doc_starts: np.ndarray
    val_doc_starts: np.ndarray


def split_documents(docs: Sequence[str], *, val_fraction: float = 0.05, min_len: int = 2) -> Corpus:
    """Splits documents into training bytes and the last `val_fraction` of bytes for validation.

    The documents are encoded as UTF-8 and concatenated in order, each followed by `DOC_END`.
    The split is deterministic: the ideal cut leaves `round(val_fraction * N)` of the N bytes
    for validation. It moves back to the last document start at or before the ideal cut,
    unless that would more than double the validation bytes, so that validation holds whole
    documents and at least the requested bytes; otherwise (a single document, or a long last
    document) it cuts through a document at the ideal place.

    Args:
      docs: the documents, in order.
      val_fraction: the fraction of bytes for validation, in (0, 1).
      min_len: the fewest bytes either side may hold, e.g. the longest evaluation length + 1.

    Returns:
      A `Corpus`.

    Raises:
      ValueError: `docs` is empty or not a sequence of strings; `val_fraction` is not in
        (0, 1); `min_len` is not a positive integer; either side would be shorter than
        `min_len`.
    """
    if isinstance(docs, str) or not all(isinstance(d, str) for d in docs):
        raise ValueError("docs must be a sequence of strings (one per document)")
    if not docs:
        raise ValueError("docs must hold at least one document, got none")
    val_fraction = _checks.positive_float("val_fraction", val_fraction)
    if val_fraction >= 1:
        raise ValueError(f"val_fraction must be a number in (0, 1), got {val_fraction}")
    min_len = _checks.positive_int("min_len", min_len)

    tokens, starts = _concatenate(docs)
    total = len(tokens)
    val_size = round(val_fraction * total)
    ideal = total - val_size
    # The last document start at or before the ideal cut: validation gets at least what was
    # asked for, and no document straddles the two sides, if that costs at most twice as much.
    boundary = int(starts[starts <= ideal][-1])
    at_document = boundary > 0 and total - boundary <= 2 * val_size and boundary >= min_len
    cut = boundary if at_document else ideal
    if total - cut < min_len:
        raise ValueError(
            f"val_fraction={val_fraction} of {total} bytes leaves {total - cut} bytes for "
            f"validation, fewer than min_len={min_len}; raise val_fraction or use more data"
        )
    if cut < min_len:
        raise ValueError(
            f"val_fraction={val_fraction} of {total} bytes leaves {cut} bytes for training, "
            f"fewer than min_len={min_len}; lower val_fraction or use more data"
        )
    return Corpus(
        train=tokens[:cut],
        val=tokens[cut:],
        train_doc_starts=starts[starts < cut],
        val_doc_starts=np.concatenate([np.zeros(1, np.int64), starts[starts > cut] - cut]),
    )


def _concatenate(docs: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Documents as one uint8 array, each followed by `DOC_END`; and int64 document starts."""
    encoded = [doc.encode("utf-8") for doc in docs]
    end = bytes([DOC_END])
    tokens = np.frombuffer(bytearray(end.join(encoded) + end), np.uint8)
    lengths = np.array([len(b) + 1 for b in encoded], np.int64)
    starts = np.concatenate([np.zeros(1, np.int64), np.cumsum(lengths)[:-1]])
    return tokens, starts


def load_corpus(
    data: str | os.PathLike | None = None, *, val_fraction: float = 0.05, min_len: int = 2
) -> Corpus:
    """`split_documents(load_text(data), ...)`: see those two for the arguments and errors."""
    return split_documents(load_text(data), val_fraction=val_fraction, min_len=min_len)


# ---------------------------------------------------------------------------------------------
# Training batches
# ---------------------------------------------------------------------------------------------


class Batches:
    """Random training batches, where batch `s` is a pure function of `(seed, s)`.

    Each batch draws from its own generator, `np.random.default_rng([seed, s])`, so a run
    resumed at step s sees exactly the batches an uninterrupted run would have seen; the
    checkpointed state is `state()`, a small JSON-able dict.

    Windows (`pack=False`): each row is a window of `seq_len + 1` bytes at a uniformly random
    start; `inputs` are its first `seq_len` bytes and `targets` the next byte at each place.
    Windows ignore document boundaries (`DOC_END` marks them in the text). `weights` are all
    ones, and there are no `segment_ids` or `positions` keys: the model numbers positions
    0..L-1 itself.

    Packing (`pack=True`): documents are cut into pieces of at most `seq_len + 1` bytes that
    start every `seq_len` bytes (overlapping by one byte, so every next-byte target of a
    document lies inside one piece). Each row of `seq_len + 1` bytes is filled with whole
    pieces drawn at random with probability proportional to their length (so each byte is
    about equally likely, as in windows), each draw among the pieces that still fit, until no
    piece fits; the rest is padding (byte 0, segment id 0). Then `inputs` = row[:-1],
    `targets` = row[1:], `segment_ids` number the pieces 1, 2, 3, ... within the row,
    `positions` restart at 0 at every piece (equal to
    `jpe.encodings.positions.positions_from_segments(segment_ids)`), and `weights` are 0 where
    the target belongs to another piece or to padding.

    Example:
      >>> batches = Batches(corpus.train, batch_size=8, seq_len=128, seed=0)
      >>> first = next(batches)  # batch 0; batches.step is now 1
      >>> saved = batches.state()  # {"step": 1, "seed": 0, ...}
      >>> Batches(corpus.train, batch_size=8, seq_len=128, seed=0).restore(saved).batch(1)

    Args:
      tokens: uint8 `[N]`, e.g. `Corpus.train`.
      batch_size: B, the rows per batch (>= 1).
      seq_len: L, the tokens per row (>= 1).
      seed: an integer >= 0.
      pack: pack documents into rows instead of cutting random windows.
      doc_starts: int `[D]`, where each document starts in `tokens` (begins with 0 and
        increases), e.g. `Corpus.train_doc_starts`; required when `pack` is True.
      step: the first step `next()` returns.

    Attributes:
      step: the step `next()` returns next.

    Raises:
      ValueError: for a bad argument, `tokens` shorter than `seq_len + 1`, or `pack=True`
        without valid `doc_starts` or with no document of at least 2 bytes.
    """

    def __init__(
        self,
        tokens,
        *,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        pack: bool = False,
        doc_starts=None,
        step: int = 0,
    ):
        self.tokens = _as_bytes("tokens", tokens)
        self.batch_size = _checks.positive_int("batch_size", batch_size)
        self.seq_len = _checks.positive_int("seq_len", seq_len)
        self.seed = _checks.positive_int("seed", seed, minimum=0)
        self.step = _checks.positive_int("step", step, minimum=0)
        if not isinstance(pack, bool):
            raise ValueError(f"pack must be True or False, got {pack!r}")
        self.pack = pack
        if len(self.tokens) < self.seq_len + 1:
            raise ValueError(
                f"tokens must hold at least seq_len + 1 = {self.seq_len + 1} bytes, got "
                f"{len(self.tokens)}; lower seq_len or use more data"
            )
        if pack:
            if doc_starts is None:
                raise ValueError("pack=True needs doc_starts (e.g. Corpus.train_doc_starts)")
            starts = _doc_starts(doc_starts, len(self.tokens))
            piece_starts, piece_lengths = _pieces(starts, len(self.tokens), self.seq_len)
            if not len(piece_starts):
                raise ValueError("pack=True needs a document of at least 2 bytes; none has")
            # Sorted by length, the pieces that fit in `space` bytes are a prefix of the list.
            order = np.argsort(piece_lengths, kind="stable")
            self.piece_starts = piece_starts[order]
            self.piece_lengths = piece_lengths[order]
            self._cumulative_lengths = np.cumsum(self.piece_lengths)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """The batch of step `step`.

        Returns:
          `{"inputs": int32 [B, L], "targets": int32 [B, L], "weights": float32 [B, L]}`, and
          with `pack=True` also `"segment_ids"` and `"positions"`, int32 `[B, L]`.
        """
        step = _checks.positive_int("step", step, minimum=0)
        rng = np.random.default_rng([self.seed, step])
        if self.pack:
            return self._packed(rng)
        length = self.seq_len
        starts = rng.integers(0, len(self.tokens) - length, size=self.batch_size)
        rows = self.tokens[starts[:, None] + np.arange(length + 1)]  # [B, L + 1]
        return {
            "inputs": rows[:, :-1].astype(np.int32),
            "targets": rows[:, 1:].astype(np.int32),
            "weights": np.ones((self.batch_size, length), np.float32),
        }

    def _packed(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        width = self.seq_len + 1
        rows = np.zeros((self.batch_size, width), np.uint8)
        segments = np.zeros((self.batch_size, width), np.int32)
        positions = np.zeros((self.batch_size, width), np.int32)
        for row in range(self.batch_size):
            used, segment = 0, 1
            while True:
                fitting = np.searchsorted(self.piece_lengths, width - used, side="right")
                if fitting == 0:
                    break
                # A piece with probability proportional to its length, among those that fit.
                draw = rng.random() * self._cumulative_lengths[fitting - 1]
                piece = np.searchsorted(self._cumulative_lengths, draw, side="right")
                start, size = self.piece_starts[piece], self.piece_lengths[piece]
                rows[row, used : used + size] = self.tokens[start : start + size]
                segments[row, used : used + size] = segment
                positions[row, used : used + size] = np.arange(size)
                used, segment = used + size, segment + 1
            positions[row, used:] = np.arange(width - used)  # padding: segment 0
        same_piece = (segments[:, 1:] == segments[:, :-1]) & (segments[:, :-1] > 0)
        return {
            "inputs": rows[:, :-1].astype(np.int32),
            "targets": rows[:, 1:].astype(np.int32),
            "weights": same_piece.astype(np.float32),
            "segment_ids": segments[:, :-1],
            "positions": positions[:, :-1],
        }

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.batch(self.step)
        self.step += 1
        return batch

    def state(self, step: int | None = None) -> dict:
        """The state to checkpoint: the next step (default `self.step`) and what fixes the stream.

        Returns:
          `{"step", "seed", "batch_size", "seq_len", "pack", "num_tokens"}`, Python ints and a
          bool (JSON-able).
        """
        step = self.step if step is None else _checks.positive_int("step", step, minimum=0)
        return {
            "step": step,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "pack": self.pack,
            "num_tokens": len(self.tokens),
        }

    def restore(self, state: Mapping) -> Batches:
        """Continues from a `state()`: sets `step`, after checking the rest matches.

        Returns:
          `self`.

        Raises:
          ValueError: `state` has no valid step, or was saved with another seed, batch size,
            sequence length, packing or amount of data (which would give other batches).
        """
        if not isinstance(state, Mapping) or "step" not in state:
            raise ValueError(f"state must be a dict from Batches.state(), got {state!r}")
        for key, value in self.state().items():
            if key != "step" and key in state and state[key] != value:
                raise ValueError(
                    f"cannot restore batches saved with {key}={state[key]!r} into batches with "
                    f"{key}={value!r}: the batches would differ from the saved run's"
                )
        self.step = _checks.positive_int("state['step']", state["step"], minimum=0)
        return self


def _doc_starts(doc_starts, num_tokens: int) -> np.ndarray:
    starts = np.asarray(doc_starts)
    if (
        starts.ndim != 1
        or not len(starts)
        or not np.issubdtype(starts.dtype, np.integer)
        or starts[0] != 0
        or np.any(np.diff(starts) <= 0)
        or starts[-1] >= num_tokens
    ):
        raise ValueError(
            "doc_starts must be a 1-D integer array that begins with 0 and increases, below "
            f"len(tokens) = {num_tokens}; got {starts!r}"
        )
    return starts.astype(np.int64)


def _pieces(starts: np.ndarray, num_tokens: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Pieces of at most seq_len + 1 bytes starting every seq_len bytes of each document.

    A document of n >= 2 bytes gives ceil((n - 1) / seq_len) pieces, each of at least 2 bytes;
    consecutive pieces share one byte, so each of the document's n - 1 targets is in one piece.
    """
    ends = np.append(starts[1:], num_tokens)
    lengths = ends - starts
    counts = np.where(lengths >= 2, -(-(lengths - 1) // seq_len), 0)
    document = np.repeat(np.arange(len(starts)), counts)
    index_in_document = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    piece_starts = starts[document] + index_in_document * seq_len
    piece_lengths = np.minimum(seq_len + 1, ends[document] - piece_starts)
    return piece_starts, piece_lengths


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def eval_windows(
    tokens, length: int, *, stride: int | None = None, max_windows: int | None = None
) -> dict[str, np.ndarray]:
    """Windows of `length` targets over `tokens` that together score every target once.

    Window w covers tokens[b_w : b_w + length + 1]: inputs are its first `length` bytes and
    targets the next byte at each place. Windows begin every `stride` bytes, b_w = w * stride,
    and a last window ends at the end of `tokens` when the regular ones fall short of it. The
    first window scores all its targets; every later one scores only the targets past the end
    of the window before it (`weights` 1 there, 0 elsewhere).

    - `stride=None` (= `length`): non-overlapping windows, as Press et al. (2022, ALiBi)
      evaluate: the target at window place j has j tokens of context before its input, so the
      perplexity averages over contexts 0..length-1. Only the last window may overlap, and it
      scores only the targets no other window did.
    - `stride < length`: sliding windows (the Hugging Face perplexity guide): after the first
      window, each scores its last `stride` targets (or fewer in the last window), each with
      at least `length - stride` tokens of context before its input.

    `max_windows` keeps that many windows, evenly spaced and always including the first, and
    drops the others' targets (none is scored twice).

    Args:
      tokens: uint8 `[N]`, e.g. `Corpus.val`; N >= length + 1.
      length: the window length L (>= 1).
      stride: None, or an integer in [1, length].
      max_windows: None (all windows) or an integer >= 1.

    Returns:
      `{"inputs": int32 [W, L], "targets": int32 [W, L], "weights": float32 [W, L]}`.

    Raises:
      ValueError: for a bad argument, or fewer than `length + 1` tokens.
    """
    tokens = _as_bytes("tokens", tokens)
    length = _checks.positive_int("length", length)
    stride = length if stride is None else _checks.positive_int("stride", stride)
    if stride > length:
        raise ValueError(f"stride must be None or an integer in [1, length={length}], got {stride}")
    if len(tokens) < length + 1:
        raise ValueError(
            f"tokens must hold at least length + 1 = {length + 1} bytes for windows of length "
            f"{length}, got {len(tokens)}"
        )
    last = len(tokens) - 1  # the index of the last target
    begins = np.arange((last - length) // stride + 1, dtype=np.int64) * stride
    if begins[-1] + length < last:
        begins = np.append(begins, last - length)
    # Window w's target j is token begins[w] + 1 + j; it is scored when it lies past the last
    # target of window w - 1 (window 0 scores from token 1, the first target, on).
    scored_through = np.concatenate([np.zeros(1, np.int64), begins[:-1] + length])
    target_index = begins[:, None] + 1 + np.arange(length)
    weights = (target_index > scored_through[:, None]).astype(np.float32)
    if max_windows is not None:
        max_windows = _checks.positive_int("max_windows", max_windows)
        if max_windows < len(begins):
            # Spacing >= 1, so the rounded indices are distinct.
            keep = np.round(np.linspace(0, len(begins) - 1, max_windows)).astype(np.int64)
            begins, weights = begins[keep], weights[keep]
    rows = tokens[begins[:, None] + np.arange(length + 1)]  # [W, L + 1]
    return {
        "inputs": rows[:, :-1].astype(np.int32),
        "targets": rows[:, 1:].astype(np.int32),
        "weights": weights,
    }
