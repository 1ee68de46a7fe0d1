"""Token classification data: CoNLL files, Python source spans, windows, packing, entity F1.

The data and metric layer for an encoder that tags every token (named entities in CoNLL-2003,
Tjong Kim Sang & De Meulder 2003, "Introduction to the CoNLL-2003 Shared Task:
Language-Independent Named Entity Recognition"). Everything runs in NumPy on the host; the
model and the training loop live in the lab's training core.

Tags. Inside jpe every tag sequence is IOB2 (Tjong Kim Sang & Veenstra 1999, "Representing
Text Chunks"): `B-TYPE` begins a span, `I-TYPE` continues it, `O` is outside every span.
`read_conll` also reads IOB1, the scheme of the original CoNLL-2003 files (Ramshaw & Marcus
1995), where a span begins with `I-TYPE` and `B-TYPE` only separates two adjacent spans of
the same type; it converts it with `iob1_to_iob2`.

Vocabularies (one id per model position, padding id 0):
- CoNLL: words, `WordVocabulary.build(train)`. The labels and the official scores are per
  word, so with one position per word the labels align one to one with the inputs, window
  and row lengths count words as the scores do, and no rule is needed for which byte or
  sub-word piece of a word carries its label (Hugging Face labels the first piece and ignores
  the rest with -100). Bytes would make sentences about six times longer for the same
  context, and the lab would measure how far an encoding extrapolates in bytes while the task
  is defined in words. Case is kept: capitalisation is the strongest single cue for English
  names. Words seen fewer than `min_count` (default 2) times in training map to the unknown
  id, so that training, too, sees the unknown id, on its rarest words.
- The built-in Python-source corpus: characters, `CHARACTERS`. Its labels are per character,
  so one position is one character; a character's id is its code point when that is below
  256 (ASCII and Latin-1, the byte model's vocabulary of 256) and `SUBSTITUTE` (0x1A, ASCII's
  substitute character) otherwise.
- Labels: `LabelVocabulary.build(train)`: `O` is id 0, then `B-T`, `I-T` for each entity
  type T seen in training, types sorted. A tag of a type that training never saw raises a
  `ValueError` (naming the tag, the document and the sentence) rather than being mapped to
  `O`, which would silently drop gold entities from the scores.

The built-in corpus, `load_python_source()`: span tagging of the standard library's own
source, labelled by Python's `tokenize` (string, comment, number, keyword, name, operator).
It ships with every CPython, so nothing is downloaded; no named-entity data set ships inside
a package (nltk, spaCy and flair download theirs).

Batches: `document_windows` cuts documents into windows whose positions run 0..L-1;
`pack_sentences` packs sentences into rows with segment ids and positions that restart at
each sentence (BERT's explicit `position_ids`) or, as a control, continue across the row.

Scores: `evaluate` gives entity-level precision, recall and F1 per type and micro-averaged
with seqeval (Nakayama 2018, https://github.com/chakki-works/seqeval), in its
conlleval-compatible default mode and in strict IOB2 mode.

Example:
  >>> corpus = load_python_source()  # stdlib files split by file into train/val/test
  >>> labels = LabelVocabulary.build(corpus.train)
  >>> batch = document_windows(corpus.train, 256, vocab=CHARACTERS, labels=labels)
  >>> packed = pack_sentences(corpus.validation, 128, vocab=CHARACTERS, labels=labels)
  >>> # predicted = model(batch["inputs"], positions=batch["positions"]).argmax(-1)
  >>> scores = evaluate(packed["labels"], predicted, labels=labels,
  ...                   weights=packed["weights"], segment_ids=packed["segment_ids"])
  >>> scores["default"]["f1"], scores["strict"]["per_type"]["string"]["f1"]
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import io
import keyword
import os
import re
import sysconfig
import tokenize
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from jpe.encodings import _checks

__all__ = [
    "CHARACTERS",
    "PAD_ID",
    "PYTHON_TYPES",
    "SCHEMES",
    "SUBSTITUTE",
    "UNKNOWN_ID",
    "CharacterVocabulary",
    "Document",
    "LabelVocabulary",
    "Sentence",
    "TaggedCorpus",
    "WordVocabulary",
    "document_windows",
    "evaluate",
    "iob1_to_iob2",
    "load_python_source",
    "pack_sentences",
    "read_conll",
    "tag_python_source",
]

#: the input id of padding, in every vocabulary (its label is 0, `O`, with weight 0)
PAD_ID = 0
#: the input id of a word that `WordVocabulary` does not hold
UNKNOWN_ID = 1
#: the input id of a character whose code point is 256 or more (ASCII SUB)
SUBSTITUTE = 0x1A
#: the tag schemes `read_conll` reads
SCHEMES = ("auto", "iob1", "iob2")
#: the span types of the Python-source corpus, in label order
PYTHON_TYPES = ("comment", "keyword", "name", "number", "operator", "string")

_TAG = re.compile(r"O|[BI]-\S+")
_DOCSTART = "-DOCSTART-"


class Sentence(NamedTuple):
    """One sentence: its tokens and their IOB2 tags, the same length (>= 1).

    Unpacks as `tokens, tags = sentence`.
    """

    tokens: tuple[str, ...]
    tags: tuple[str, ...]


#: a document: its sentences, in order
Document = list[Sentence]


# ---------------------------------------------------------------------------------------------
# Tags
# ---------------------------------------------------------------------------------------------


def _type(tag: str) -> str | None:
    return None if tag == "O" else tag[2:]


def iob1_to_iob2(tags: Sequence[str]) -> list[str]:
    """One sentence's IOB1 tags as IOB2.

    In IOB1 a span begins with `I-X`; `B-X` marks only the first token of a span that follows
    another span of type X directly. In IOB2 every span begins with `B-X`. So an `I-X` that
    begins a span (first in the sentence, after `O`, or after a tag of another type) becomes
    `B-X`, and every other tag is kept. Valid IOB2 comes back unchanged, so this also reads a
    file whose scheme is not known.

    Example:
      >>> iob1_to_iob2(["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-ORG"])
      ['B-PER', 'I-PER', 'O', 'B-LOC', 'B-LOC', 'B-ORG']

    Args:
      tags: `O`, `B-X` or `I-X` for each token (not checked here; `read_conll` checks).

    Returns:
      The IOB2 tags, a new list.
    """
    out, previous = [], None
    for tag in tags:
        kind = _type(tag)
        if tag.startswith("I-") and kind != previous:
            tag = "B-" + kind
        out.append(tag)
        previous = kind
    return out


def _starts_span_with_i(tags: Sequence[str]) -> int | None:
    """The index of the first `I-X` that does not continue an X span (invalid IOB2), or None."""
    previous = None
    for index, tag in enumerate(tags):
        kind = _type(tag)
        if tag.startswith("I-") and kind != previous:
            return index
        previous = kind
    return None


# ---------------------------------------------------------------------------------------------
# CoNLL files
# ---------------------------------------------------------------------------------------------


def read_conll(
    path: str | os.PathLike, *, scheme: str = "auto", encoding: str = "utf-8"
) -> list[Document]:
    """Documents of tagged sentences from a file in CoNLL-2003 column format.

    One token a line, columns separated by whitespace: the token first, its tag last (CoNLL-2003
    has four columns, word, part of speech, chunk and entity tag; two columns, token and tag,
    are read as well; every token line of a file must have the same number). A blank line
    ends a sentence. A `-DOCSTART-` line begins a new document (a file without one is one
    document). Empty documents are dropped.

    Tags are `O`, `B-TYPE` or `I-TYPE`, read as `scheme`:
    - `"iob2"`: every span begins with `B-TYPE`; an `I-TYPE` that begins a span is an error.
    - `"iob1"`: converted to IOB2 by `iob1_to_iob2`.
    - `"auto"` (default): the same conversion, which leaves valid IOB2 unchanged: a file is
      IOB1 exactly when some `I-TYPE` begins a span, so either scheme reads correctly.

    Args:
      path: the file.
      scheme: one of `SCHEMES`.
      encoding: the file's text encoding.

    Returns:
      The documents, each a non-empty list of `Sentence`s with IOB2 tags.

    Raises:
      ValueError: naming the file and line: a token line with another number of columns than
        the file's first, or fewer than 2; a tag that is not `O`, `B-TYPE` or `I-TYPE` (IOBES
        or BILOU files need converting first); a tag on a line with no token (a line between
        sentences must be blank); a tag other than `O` on a `-DOCSTART-` line; an `I-TYPE` that
        begins a span with `scheme="iob2"`; text that is not in `encoding`. Naming the file:
        a file that is missing, empty, or holds no sentence.
    """
    _checks.one_of("scheme", scheme, SCHEMES)
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    raw = path.read_bytes()
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(
            f"{path}, line {line}: byte 0x{raw[e.start]:02x} is not {encoding} text "
            f"({e.reason}); pass the file's encoding"
        ) from None
    if not text.strip():
        raise ValueError(f"{path}: the file is empty (a CoNLL file holds one token a line)")

    documents: list[Document] = []
    sentences: Document = []
    tokens: list[str] = []
    tags: list[str] = []
    line_numbers: list[int] = []
    num_columns = None

    def end_sentence():
        if tokens:
            sentences.append(_conll_sentence(tokens, tags, line_numbers, scheme, path))
            tokens.clear()
            tags.clear()
            line_numbers.clear()

    def end_document():
        end_sentence()
        if sentences:
            documents.append(sentences.copy())
            sentences.clear()

    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        where = f"{path}, line {number}"
        if not line.strip():
            end_sentence()
            continue
        columns = line.split()
        if line[0].isspace():
            raise ValueError(
                f"{where}: {columns[-1]!r} on a line with no token ({line!r}); the line "
                "between two sentences must be blank, and a token line starts with its token"
            )
        if columns[0] == _DOCSTART:
            if len(columns) > 1 and columns[-1] != "O":
                raise ValueError(
                    f"{where}: the tag {columns[-1]!r} on a {_DOCSTART} line; a document "
                    "separator carries no entity (its tag, if any, is O)"
                )
            end_document()
            continue
        if len(columns) < 2 or (num_columns is not None and len(columns) != num_columns):
            expected = "at least 2" if num_columns is None else f"{num_columns}, as earlier lines"
            raise ValueError(
                f"{where}: {len(columns)} column(s) in {line!r}; a token line needs {expected}: "
                "the token first and its tag last, separated by whitespace (e.g. "
                "'EU NNP B-NP B-ORG'); a token cannot hold a space"
            )
        num_columns = len(columns)
        tag = columns[-1]
        if not _TAG.fullmatch(tag):
            raise ValueError(
                f"{where}: unknown tag {tag!r}; tags must be O, B-TYPE or I-TYPE (IOB1 or "
                "IOB2); files in IOBES or BILOU need converting first"
            )
        tokens.append(columns[0])
        tags.append(tag)
        line_numbers.append(number)
    end_document()
    if not documents:
        raise ValueError(f"{path}: the file holds no sentence, only {_DOCSTART} and blank lines")
    return documents


def _conll_sentence(tokens, tags, line_numbers, scheme: str, path: Path) -> Sentence:
    if scheme == "iob2":
        bad = _starts_span_with_i(tags)
        if bad is not None:
            after = "at the start of a sentence" if bad == 0 else f"after {tags[bad - 1]!r}"
            raise ValueError(
                f"{path}, line {line_numbers[bad]}: {tags[bad]!r} {after} begins a span, which "
                "IOB2 does not allow (it begins spans with B-); this looks like IOB1: read it "
                "with scheme='iob1' or 'auto'"
            )
        return Sentence(tuple(tokens), tuple(tags))
    return Sentence(tuple(tokens), tuple(iob1_to_iob2(tags)))


# ---------------------------------------------------------------------------------------------
# Vocabularies
# ---------------------------------------------------------------------------------------------


def _sentences(documents: Iterable[Document]) -> Iterable[Sentence]:
    for document in documents:
        yield from document


@dataclasses.dataclass(frozen=True, eq=False)
class WordVocabulary:
    """Words as ids: `PAD_ID` (0) is padding, `UNKNOWN_ID` (1) any word not held.

    Attributes:
      words: the word of each id; `words[0]` is `"<pad>"` and `words[1]` is `"<unk>"`, then
        the training words by descending count, ties in code-point order.
    """

    words: tuple[str, ...]
    _ids: dict = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "_ids", {word: i for i, word in enumerate(self.words)})

    @classmethod
    def build(cls, documents: Sequence[Document], *, min_count: int = 2) -> WordVocabulary:
        """The words of `documents` (the training split) seen at least `min_count` times.

        Case is kept. With `min_count=2` the words seen once in training map to the unknown
        id, so the model learns an embedding for it from training data.

        Raises:
          ValueError: `min_count` is not an integer >= 1.
        """
        min_count = _checks.positive_int("min_count", min_count)
        counts = collections.Counter(
            token for sentence in _sentences(documents) for token in sentence.tokens
        )
        reserved = ("<pad>", "<unk>")  # a word spelled so in the data maps to the unknown id
        kept = [w for w, c in counts.items() if c >= min_count and w not in reserved]
        return cls((*reserved, *sorted(kept, key=lambda w: (-counts[w], w))))

    @property
    def size(self) -> int:
        """The number of ids, the model's input vocabulary size."""
        return len(self.words)

    def encode(self, tokens: Sequence[str]) -> np.ndarray:
        """int32 `[len(tokens)]`: each word's id, `UNKNOWN_ID` for words not held."""
        ids = self._ids
        return np.array([ids.get(t, UNKNOWN_ID) for t in tokens], np.int32).reshape(-1)


@dataclasses.dataclass(frozen=True)
class CharacterVocabulary:
    """Characters as ids: the code point below 256, `SUBSTITUTE` above; `PAD_ID` is padding.

    Python source never holds the NUL character, so id 0 is free for padding.
    """

    size: int = 256

    def encode(self, tokens: Sequence[str]) -> np.ndarray:
        """int32 `[len(tokens)]`, one id per token, each token one character.

        Raises:
          ValueError: a token is not exactly one character.
        """
        bad = next((t for t in tokens if not isinstance(t, str) or len(t) != 1), None)
        if bad is not None:
            raise ValueError(f"character tokens must be one character each, got {bad!r}")
        text = "".join(tokens)
        points = np.frombuffer(text.encode("utf-32-le"), "<u4").astype(np.int64)
        return np.where(points < self.size, points, SUBSTITUTE).astype(np.int32)


#: the character vocabulary of the Python-source corpus
CHARACTERS = CharacterVocabulary()


@dataclasses.dataclass(frozen=True)
class LabelVocabulary:
    """IOB2 tags as label ids: `O` is 0, then `B-T` = 2k + 1 and `I-T` = 2k + 2 for `types[k]`.

    Attributes:
      types: the entity types, sorted.
    """

    types: tuple[str, ...]

    def __post_init__(self):
        object.__setattr__(self, "types", tuple(self.types))
        if list(self.types) != sorted(set(self.types)) or not all(
            t and not any(c.isspace() for c in t) for t in self.types
        ):
            raise ValueError(
                f"types must be distinct non-empty names without spaces, sorted; got {self.types!r}"
            )

    @classmethod
    def build(cls, documents: Sequence[Document]) -> LabelVocabulary:
        """The entity types of `documents` (the training split)."""
        types = {_type(tag) for sentence in _sentences(documents) for tag in sentence.tags}
        return cls(tuple(sorted(types - {None})))

    @property
    def tags(self) -> tuple[str, ...]:
        """The tag of each label id."""
        return ("O", *(f"{prefix}-{t}" for t in self.types for prefix in "BI"))

    @property
    def size(self) -> int:
        """The number of labels, the classifier's output size."""
        return 1 + 2 * len(self.types)

    def encode(self, tags: Sequence[str]) -> np.ndarray:
        """int32 `[len(tags)]` label ids.

        Raises:
          ValueError: a tag is not `O`, `B-T` or `I-T` for a type T of this vocabulary.
        """
        ids = {tag: i for i, tag in enumerate(self.tags)}
        try:
            return np.array([ids[tag] for tag in tags], np.int32).reshape(-1)
        except KeyError as e:
            raise ValueError(
                f"the tag {e.args[0]!r} is not in the label vocabulary, whose types (from the "
                f"training data) are {list(self.types)}; relabel it or add its type to training"
            ) from None

    def decode(self, ids) -> list[str]:
        """The tags of label ids `[n]`."""
        tags = self.tags
        return [tags[i] for i in np.asarray(ids).reshape(-1).tolist()]


# ---------------------------------------------------------------------------------------------
# The built-in corpus: Python source, tagged by `tokenize`
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class TaggedCorpus:
    """Tagged documents split into training, validation and test sets.

    Attributes:
      train: the training documents.
      validation: the validation documents.
      test: the test documents.
      files: for each split name (`"train"`, `"validation"`, `"test"`), the file of each of its
        documents, relative to the folder they came from.
    """

    train: list[Document]
    validation: list[Document]
    test: list[Document]
    files: Mapping[str, tuple[str, ...]]


def _python_type(token: tokenize.TokenInfo) -> str | None:
    kind = token.type
    if kind == tokenize.NAME:
        return "keyword" if keyword.iskeyword(token.string) else "name"
    return {
        tokenize.STRING: "string",
        tokenize.COMMENT: "comment",
        tokenize.NUMBER: "number",
        tokenize.OP: "operator",
    }.get(kind)


def tag_python_source(text: str, *, name: str = "<string>") -> Document:
    """Python source as one document: each line a sentence of characters with IOB2 tags.

    Each character is tagged by the token of Python's `tokenize` it belongs to: `string`
    (an f-string whole, replacement fields included, on every Python version), `comment`,
    `number`, `keyword` (`keyword.iskeyword`; soft keywords such as `match` are names),
    `name` or `operator`. Whitespace, newlines, indentation and line continuations are `O`.
    Each token is one span; a token that spans lines (a triple-quoted string) is one span
    per line, since every line is a sentence and a sentence starts afresh. A line keeps its
    newline character, so the sentences joined give `text` back.

    Example:
      >>> [s.tags for s in tag_python_source("x=1\\n")]
      [('B-name', 'B-operator', 'B-number', 'O')]

    Args:
      text: Python source; line breaks are `\\n` (files read with universal newlines).
      name: what error messages call the text, e.g. its file.

    Returns:
      A `Document` with one `Sentence` per line (none for empty `text`); tokens are the
      line's characters.

    Raises:
      ValueError: `tokenize` fails on `text` (e.g. an unterminated string or inconsistent
        dedent) or gives an error token for a character that is not whitespace.
    """
    lines = io.StringIO(text).readlines()
    line_starts = np.cumsum([0] + [len(line) for line in lines])
    kinds = np.zeros(len(text), np.int64)  # 0 = O, k = PYTHON_TYPES[k - 1]
    begins = np.zeros(len(text), bool)

    def mark(start: tuple[int, int], end: tuple[int, int], kind: str):
        first = line_starts[start[0] - 1] + start[1]
        last = line_starts[end[0] - 1] + end[1]
        kinds[first:last] = PYTHON_TYPES.index(kind) + 1
        begins[first] = True

    fstring_depth, fstring_start = 0, None
    try:
        for token in tokenize.generate_tokens(io.StringIO(text).readline):
            # Python 3.12 splits f-strings (3.14 also t-strings) into START, the parts and the
            # replacement fields' own tokens, and END; 3.11 gives one STRING. Keep one span.
            kind_name = tokenize.tok_name[token.type]
            if kind_name.endswith("STRING_START"):
                fstring_depth += 1
                fstring_start = fstring_start if fstring_depth > 1 else token.start
            elif fstring_depth:
                if kind_name.endswith("STRING_END"):
                    fstring_depth -= 1
                    if not fstring_depth:
                        mark(fstring_start, token.end, "string")
            elif tokenize.ERRORTOKEN == token.type and token.string.strip():
                raise ValueError(
                    f"{name}, line {token.start[0]}: tokenize gives an error token {token.string!r}"
                )
            elif (kind := _python_type(token)) is not None:
                mark(token.start, token.end, kind)
    except (tokenize.TokenError, SyntaxError) as e:
        raise ValueError(f"{name}: Python's tokenize fails: {e}") from None

    tag_table = np.array(
        ["O", *(f"B-{t}" for t in PYTHON_TYPES), *(f"I-{t}" for t in PYTHON_TYPES)]
    )
    line_firsts = np.zeros(len(text), bool)
    line_firsts[line_starts[:-1]] = True
    # B- where a token starts or (for a token that spans lines) where a line starts inside it.
    tag_index = np.where(kinds == 0, 0, np.where(begins | line_firsts, kinds, kinds + 6))
    tags = tag_table[tag_index].tolist()
    return [
        Sentence(tuple(line), tuple(tags[start : start + len(line)]))
        for line, start in zip(lines, line_starts[:-1].tolist(), strict=True)
    ]


def load_python_source(
    root: str | os.PathLike | None = None,
    *,
    max_chars: int = 500_000,
    max_file_chars: int = 40_000,
) -> TaggedCorpus:
    """The built-in corpus: the standard library's source, tagged by `tag_python_source`.

    Files: the `.py` files directly in `root` (default: the standard library's folder,
    `sysconfig.get_paths()["stdlib"]`) whose names do not start with `_` or `.` (this skips
    private helpers and the platform-generated `_sysconfigdata_*`), in sorted order. A file is
    skipped when it is longer than `max_file_chars` characters (so no one module dominates),
    is empty, cannot be decoded, or fails to tokenize. Files are taken in order while their
    total stays within `max_chars`; the first that would pass it ends the selection. Files
    are read as Python reads them (`tokenize.open`: the coding cookie, universal newlines).

    The split is by file, deterministic: the i-th selected file goes to validation when
    i % 10 == 8, to test when i % 10 == 9, and to training otherwise. A file is one document.

    On CPython 3.11.7 the defaults select 32 files, `abc.py` to `fractions.py`: 26 for
    training (403,119 characters, 11,676 lines), 3 for validation (`bz2.py`, `colorsys.py`,
    `filecmp.py`: 26,087 characters) and 3 for test (`cProfile.py`, `compileall.py`,
    `fileinput.py`: 42,312 characters), all Latin-1; loading takes about half a second. Other
    Python versions select other files.

    Args:
      root: the folder, or None for the standard library.
      max_chars: the most characters in all (>= 1).
      max_file_chars: the most characters in one file (>= 1).

    Returns:
      A `TaggedCorpus`; its `files` are the file names.

    Raises:
      ValueError: `root` is not a folder, a size is not a positive integer, or fewer than 10
        files are selected (each split needs one).
    """
    root = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    if not root.is_dir():
        raise ValueError(f"root: {str(root)!r} is not a folder")
    max_chars = _checks.positive_int("max_chars", max_chars)
    max_file_chars = _checks.positive_int("max_file_chars", max_file_chars)

    names, documents, total = [], [], 0
    for path in sorted(root.glob("*.py")):
        if path.name.startswith(("_", ".")) or not path.is_file():
            continue
        try:
            with tokenize.open(path) as f:
                text = f.read()
        except (OSError, SyntaxError, UnicodeDecodeError):  # a bad coding cookie or bytes
            continue
        if not text or len(text) > max_file_chars:
            continue
        if total + len(text) > max_chars:
            break
        try:
            document = tag_python_source(text, name=str(path))
        except ValueError:
            continue
        names.append(path.name)
        documents.append(document)
        total += len(text)
    if len(documents) < 10:
        raise ValueError(
            f"root: {len(documents)} usable .py files in {str(root)!r} within max_chars="
            f"{max_chars} and max_file_chars={max_file_chars}; the split by file needs at "
            "least 10"
        )
    splits = {"train": [], "validation": [], "test": []}
    files = {"train": [], "validation": [], "test": []}
    for index, (name, document) in enumerate(zip(names, documents, strict=True)):
        split = {8: "validation", 9: "test"}.get(index % 10, "train")
        splits[split].append(document)
        files[split].append(name)
    return TaggedCorpus(**splits, files={k: tuple(v) for k, v in files.items()})


# ---------------------------------------------------------------------------------------------
# Windows and packing
# ---------------------------------------------------------------------------------------------


def _encoded(documents: Sequence[Document], vocab, labels: LabelVocabulary):
    """Per document, per sentence: (input ids int32 [n], label ids int32 [n])."""
    if isinstance(documents, str) or any(
        isinstance(d, Sentence) or not isinstance(d, list | tuple) for d in documents
    ):
        raise ValueError(
            "documents must be a sequence of documents, each a list of Sentence (for one "
            "document, pass [document])"
        )
    out = []
    for d, document in enumerate(documents):
        encoded = []
        for s, sentence in enumerate(document):
            tokens, tags = sentence
            if len(tokens) != len(tags):
                raise ValueError(
                    f"document {d}, sentence {s}: {len(tokens)} tokens but {len(tags)} tags"
                )
            try:
                encoded.append((vocab.encode(tokens), labels.encode(tags)))
            except ValueError as e:
                raise ValueError(f"document {d}, sentence {s}: {e}") from None
        out.append(encoded)
    return out


def _rows(rows: list[list[tuple[np.ndarray, np.ndarray]]], length: int) -> dict[str, np.ndarray]:
    """Rows of `length` from segments (input ids, label ids); positions restart per segment."""
    shape = (len(rows), length)
    batch = {
        "inputs": np.full(shape, PAD_ID, np.int32),
        "labels": np.zeros(shape, np.int32),
        "weights": np.zeros(shape, np.float32),
        "positions": np.zeros(shape, np.int32),
        "segment_ids": np.zeros(shape, np.int32),
    }
    for row, segments in enumerate(rows):
        used = 0
        for segment, (inputs, label_ids) in enumerate(segments, start=1):
            place = slice(used, used + len(inputs))
            batch["inputs"][row, place] = inputs
            batch["labels"][row, place] = label_ids
            batch["weights"][row, place] = 1.0
            batch["segment_ids"][row, place] = segment
            batch["positions"][row, place] = np.arange(len(inputs))
            used += len(inputs)
        # Padding counts as a segment of its own, as in positions_from_segments.
        batch["positions"][row, used:] = np.arange(length - used)
    return batch


def document_windows(
    documents: Sequence[Document], length: int, *, vocab, labels: LabelVocabulary
) -> dict[str, np.ndarray]:
    """Each document cut into windows of `length` tokens, positions 0..L-1 in every window.

    A document's sentences are joined into one token sequence (sentence boundaries do not
    matter here: positions continue across them), cut every `length` tokens; its last window
    is padded. Windows never cross documents. Every token is in exactly one window. A span
    that a window edge cuts stays as it is (the next window begins with its `I-` tags), so the
    scores count it as two entities in gold and prediction alike (in strict mode the second
    part, beginning with `I-`, is not an entity).

    Args:
      documents: the documents.
      length: L, the window length (>= 1).
      vocab: `WordVocabulary` or `CHARACTERS`: anything with `encode(tokens) -> int32 [n]`.
      labels: the `LabelVocabulary`.

    Returns:
      `{"inputs", "labels", "positions", "segment_ids"}` int32 `[N, L]` and `"weights"`
      float32 `[N, L]`: weights 1 on tokens, 0 on padding; segment ids 1 on tokens, 0 on
      padding; positions 0..L-1 in every row; padding inputs `PAD_ID` and labels 0.

    Raises:
      ValueError: a bad argument, or a tag that `labels` does not hold (naming the document
        and sentence).
    """
    length = _checks.positive_int("length", length)
    rows = []
    for document in _encoded(documents, vocab, labels):
        if not document:
            continue
        inputs = np.concatenate([inputs for inputs, _ in document])
        label_ids = np.concatenate([label_ids for _, label_ids in document])
        for start in range(0, len(inputs), length):
            window = slice(start, start + length)
            rows.append([(inputs[window], label_ids[window])])
    batch = _rows(rows, length)
    batch["positions"][:] = np.arange(length, dtype=np.int32)  # over the padding too
    return batch


def pack_sentences(
    documents: Sequence[Document],
    length: int,
    *,
    vocab,
    labels: LabelVocabulary,
    positions: str = "restart",
) -> dict[str, np.ndarray]:
    """Sentences packed into rows of `length` tokens, with segment ids and explicit positions.

    Sentences are taken in order (documents in order, then their sentences) and each goes into
    the current row if it fits there, else it begins a new row (first fit in order, so the
    rows are deterministic). A sentence longer than `length` is cut into pieces of `length`
    tokens, each packed as a sentence of its own (its tags unchanged). Each row numbers its
    sentences 1, 2, ... in `segment_ids`; the rest of the row is padding, segment 0.

    - `positions="restart"`: each sentence's positions start at 0, so each sentence sees
      the positions it would see alone; a BERT model takes them as its explicit
      `position_ids` (Hugging Face's `BertForTokenClassification(..., position_ids=...)`).
      Equal to `jpe.encodings.positions.positions_from_segments(segment_ids)`.
    - `positions="continue"`: 0..L-1 over the whole row, as if the row were one text; the
      control that shows what restarting changes.

    Args:
      documents: the documents.
      length: L, the row length (>= 1).
      vocab: `WordVocabulary` or `CHARACTERS`: anything with `encode(tokens) -> int32 [n]`.
      labels: the `LabelVocabulary`.
      positions: `"restart"` or `"continue"`.

    Returns:
      `{"inputs", "labels", "positions", "segment_ids"}` int32 `[N, L]` and `"weights"`
      float32 `[N, L]`: weights 1 on tokens, 0 on padding; padding inputs `PAD_ID`, labels 0.

    Raises:
      ValueError: a bad argument, or a tag that `labels` does not hold (naming the document
        and sentence).
    """
    length = _checks.positive_int("length", length)
    _checks.one_of("positions", positions, ("restart", "continue"))
    rows: list[list] = []
    used = length  # the first sentence begins a row
    for document in _encoded(documents, vocab, labels):
        for inputs, label_ids in document:
            for start in range(0, len(inputs), length):
                piece = (inputs[start : start + length], label_ids[start : start + length])
                if used + len(piece[0]) > length:
                    rows.append([])
                    used = 0
                rows[-1].append(piece)
                used += len(piece[0])
    batch = _rows(rows, length)
    if positions == "continue":
        batch["positions"][:] = np.arange(length, dtype=np.int32)
    return batch


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def _tag_sequences(ids: np.ndarray, masks: list[tuple[int, np.ndarray]], tags: tuple[str, ...]):
    """The tags of `ids[row][mask]` for each (row, mask)."""
    return [[tags[i] for i in ids[row][mask].tolist()] for row, mask in masks]


def evaluate(
    gold,
    predicted,
    *,
    labels: LabelVocabulary,
    weights,
    segment_ids=None,
) -> dict:
    """Entity-level precision, recall and F1 of predicted label ids, per type and micro-averaged.

    The label ids are turned back into one tag sequence per sentence: per row, the tokens of
    each segment id > 0 (in order of appearance), or the whole row when `segment_ids` is None,
    keeping only tokens with weight > 0. An entity is a (sentence, type, first token, last
    token); precision = correct / predicted entities, recall = correct / gold entities, F1
    their harmonic mean; micro averages count over all types. Both of seqeval's modes:

    - `"default"`: conlleval-compatible (the CoNLL shared tasks' scoring script): an `I-X`
      after `O` or after another type begins an entity.
    - `"strict"`: seqeval's `mode="strict", scheme=IOB2` (its `metrics.v1` scores, called
      directly so that the entities are found once): an entity is a `B-X` followed by `I-X`
      tags only; a stray `I-X` is no entity.

    A score whose denominator is 0 is 0 (seqeval's `zero_division=0`). Every type of `labels`
    is reported, with support 0 when it has no gold entity.

    Args:
      gold: integer `[N, L]`, the gold label ids (e.g. the batch's `labels`).
      predicted: integer `[N, L]`, the predicted label ids (e.g. the logits' argmax).
      labels: the `LabelVocabulary` of both.
      weights: `[N, L]`; tokens with weight 0 (padding) are left out.
      segment_ids: integer `[N, L]` or None: the sentences within each row (0 = padding).

    Returns:
      A JSON-ready dict: `{"default": scores, "strict": scores, "sentences": int, "tokens":
      int}`, where scores are `{"precision", "recall", "f1": float, "support": int,
      "per_type": {type: {"precision", "recall", "f1", "support"}}}` and support counts gold
      entities.

    Raises:
      ValueError: the shapes differ or are not `[N, L]`, ids or segment ids are not
        integers, or an id is outside the labels.
    """
    # seqeval imports scikit-learn (about a second), so only when scoring.
    from seqeval.metrics import sequence_labeling, v1
    from seqeval.scheme import IOB2, Entities

    gold, predicted = np.asarray(gold), np.asarray(predicted)
    arrays = {"gold": gold, "predicted": predicted, "weights": np.asarray(weights)}
    if segment_ids is not None:
        arrays["segment_ids"] = np.asarray(segment_ids)
    if any(a.ndim != 2 or a.shape != gold.shape for a in arrays.values()):
        shapes = ", ".join(f"{k} {v.shape}" for k, v in arrays.items())
        raise ValueError(
            f"gold, predicted, weights, segment_ids must share a shape [N, L]: {shapes}"
        )
    for name in ("gold", "predicted", "segment_ids"):
        array = arrays.get(name)
        if array is not None and not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"{name} must have an integer dtype, got {array.dtype}")
    for name, array in (("gold", gold), ("predicted", predicted)):
        if array.size and (array.min() < 0 or array.max() >= labels.size):
            raise ValueError(
                f"{name} must hold label ids in [0, {labels.size}), got {array.min()} to "
                f"{array.max()}"
            )

    kept = arrays["weights"] > 0
    masks = []  # (row, the tokens of one sentence), in order
    for row in range(gold.shape[0]):
        if segment_ids is None:
            if kept[row].any():
                masks.append((row, kept[row]))
            continue
        row_segments = arrays["segment_ids"][row]
        segments, first = np.unique(row_segments, return_index=True)
        for segment in segments[np.argsort(first)]:
            mask = kept[row] & (row_segments == segment)
            if segment != 0 and mask.any():
                masks.append((row, mask))
    y_true = _tag_sequences(gold, masks, labels.tags)
    y_pred = _tag_sequences(predicted, masks, labels.tags)

    # Per type, seqeval's arrays follow the sorted names of the types that have any entity.
    default_names = sorted(
        {kind for tags in (y_true, y_pred) for kind, _, _ in sequence_labeling.get_entities(tags)}
    )
    default = functools.partial(
        sequence_labeling.precision_recall_fscore_support, y_true, y_pred, zero_division=0
    )
    # Entities found once serve both calls, as seqeval's own classification_report does.
    strict_true, strict_pred = Entities(y_true, IOB2), Entities(y_pred, IOB2)
    strict_names = sorted(strict_true.unique_tags | strict_pred.unique_tags)
    strict = functools.partial(
        v1.precision_recall_fscore_support,
        y_true,
        y_pred,
        zero_division=0,
        scheme=IOB2,
        entities_true=strict_true,
        entities_pred=strict_pred,
    )
    return {
        "default": _scores(default, default_names, labels.types),
        "strict": _scores(strict, strict_names, labels.types),
        "sentences": len(masks),
        "tokens": int(sum(int(mask.sum()) for _, mask in masks)),
    }


def _scores(precision_recall_f1_support, names: list[str], types: Sequence[str]) -> dict:
    def as_dict(p, r, f, s) -> dict:
        return {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}

    per_type = {kind: as_dict(0, 0, 0, 0) for kind in types}
    per_type.update(
        (name, as_dict(*row))
        for name, *row in zip(names, *precision_recall_f1_support(average=None), strict=True)
    )
    return {**as_dict(*precision_recall_f1_support(average="micro")), "per_type": per_type}
