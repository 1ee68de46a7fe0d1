"""Tests for jpe.lab.tagging: CoNLL files, Python-source spans, windows, packing, entity F1."""

import io
import json
import keyword
import tokenize

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jpe.encodings.positions import positions_from_segments
from jpe.lab import tagging
from jpe.lab.tagging import Sentence


@pytest.fixture(scope="module")
def corpus():
    return tagging.load_python_source()


def write(tmp_path, text, name="data.conll"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def spans(tags):
    """(type, start, end) of each span of valid IOB2 tags; fails on an I- that begins a span."""
    found, current = [], None
    for i, tag in enumerate([*tags, "O"]):
        if current is not None and tag != f"I-{current[0]}":
            found.append((current[0], current[1], i))
            current = None
        if tag.startswith("B-"):
            current = (tag[2:], i)
        elif tag.startswith("I-"):
            assert current is not None, f"{tag} begins a span at {i} in {tags}"
    return found


# ------------------------------------------------------------------------------ CoNLL reader

IOB2_FILE = """\
-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O
. . O O

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER

-DOCSTART- -X- -X- O

BRUSSELS NNP B-NP B-LOC
1996-08-22 CD I-NP O
"""


def test_reads_documents_of_sentences(tmp_path):
    documents = tagging.read_conll(write(tmp_path, IOB2_FILE))
    assert documents == [
        [
            Sentence(("EU", "rejects", "German", "call", "."), ("B-ORG", "O", "B-MISC", "O", "O")),
            Sentence(("Peter", "Blackburn"), ("B-PER", "I-PER")),
        ],
        [Sentence(("BRUSSELS", "1996-08-22"), ("B-LOC", "O"))],
    ]
    for scheme in tagging.SCHEMES:  # valid IOB2 reads the same in every scheme
        assert tagging.read_conll(write(tmp_path, IOB2_FILE), scheme=scheme) == documents


def test_file_without_docstart_is_one_document_with_two_columns(tmp_path):
    path = write(tmp_path, "a O\nb B-X\n\n\n\nc I-X\r\nd I-X\n")
    assert tagging.read_conll(path) == [
        [Sentence(("a", "b"), ("O", "B-X")), Sentence(("c", "d"), ("B-X", "I-X"))]
    ]


# IOB1 as in the original CoNLL-2003 files, and the IOB2 written out by hand.
IOB1_FILE = """\
-DOCSTART- -X- O O

Wolfgang NNP I-NP I-PER
Schmidt NNP I-NP I-PER
of IN I-PP O
Paris NNP I-NP I-LOC
Lyon NNP I-NP B-LOC
Marseille NNP I-NP I-LOC
Reuters NNP I-NP I-ORG
Bonn NNP I-NP I-LOC
says VBZ I-VP O

German JJ I-NP I-MISC
"""
IOB1_AS_IOB2 = [
    (
        "B-PER",  # I- at the start of a sentence begins a span
        "I-PER",
        "O",
        "B-LOC",  # I- after O begins a span
        "B-LOC",  # B- separates two adjacent LOC spans
        "I-LOC",
        "B-ORG",  # I- after another type begins a span
        "B-LOC",
        "O",
    ),
    ("B-MISC",),
]


@pytest.mark.parametrize("scheme", ["iob1", "auto"])
def test_iob1_is_converted_to_iob2(tmp_path, scheme):
    (document,) = tagging.read_conll(write(tmp_path, IOB1_FILE), scheme=scheme)
    assert [sentence.tags for sentence in document] == IOB1_AS_IOB2
    assert document[0].tokens[:2] == ("Wolfgang", "Schmidt")
    assert spans(document[0].tags) == [
        ("PER", 0, 2),
        ("LOC", 3, 4),
        ("LOC", 4, 6),
        ("ORG", 6, 7),
        ("LOC", 7, 8),
    ]


tags_strategy = st.lists(st.sampled_from(["O", "B-A", "I-A", "B-B", "I-B"]), max_size=12)


@given(tags_strategy)
def test_iob1_to_iob2_gives_valid_iob2_and_keeps_valid_iob2(tags):
    converted = tagging.iob1_to_iob2(tags)
    spans(converted)  # valid IOB2: no I- begins a span
    assert tagging.iob1_to_iob2(converted) == converted
    # Only a span-opening I- changes, and only its prefix.
    for before, after in zip(tags, converted, strict=True):
        assert after == before or (before.startswith("I-") and after == "B-" + before[2:])


CONLL_ERRORS = {
    "one column": ("EU B-ORG\nrejects\n", 2, "1 column(s)"),
    "one column first": ("EU\n", 1, "at least 2"),
    "fewer columns than earlier lines": ("EU NNP B-NP B-ORG\nrejects VBZ O\n", 2, "3 column"),
    "IOBES tag": ("EU NNP B-NP B-ORG\n\nBonn NNP B-NP S-LOC\n", 3, "unknown tag 'S-LOC'"),
    "tag without prefix": ("EU ORG\n", 1, "unknown tag 'ORG'"),
    "prefix without type": ("EU B-\n", 1, "unknown tag 'B-'"),
    "tag on a blank line": ("EU B-ORG\n   O\nrejects O\n", 2, "no token"),
    "tag on a docstart line": ("-DOCSTART- -X- B-ORG\n\nEU B-ORG\n", 1, "-DOCSTART-"),
}


@pytest.mark.parametrize("case", CONLL_ERRORS, ids=list(CONLL_ERRORS))
def test_bad_conll_names_file_and_line(tmp_path, case):
    text, line, what = CONLL_ERRORS[case]
    path = write(tmp_path, text)
    with pytest.raises(ValueError, match=r"line \d+") as error:
        tagging.read_conll(path)
    assert str(path) in str(error.value)
    assert f"line {line}:" in str(error.value)
    assert what in str(error.value)


def test_iob1_read_as_iob2_names_file_and_line(tmp_path):
    path = write(tmp_path, IOB1_FILE)
    with pytest.raises(ValueError, match="IOB2 does not allow") as error:
        tagging.read_conll(path, scheme="iob2")
    assert f"{path}, line 3:" in str(error.value)  # Wolfgang I-PER


def test_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.conll"
    path.write_bytes("EU B-ORG\n\nK\xf6ln B-LOC\n".encode("latin-1"))
    with pytest.raises(ValueError, match="line 3: byte 0xf6") as error:
        tagging.read_conll(path)
    assert str(path) in str(error.value)
    assert tagging.read_conll(path, encoding="latin-1")[0][1].tokens == ("Köln",)


@pytest.mark.parametrize("text", ["", "\n \n", "-DOCSTART- -X- -X- O\n\n-DOCSTART- -X- O O\n"])
def test_empty_conll_names_file(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(ValueError, match="empty|no sentence") as error:
        tagging.read_conll(path)
    assert str(path) in str(error.value)


def test_bad_scheme_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="scheme must be one of"):
        tagging.read_conll(write(tmp_path, IOB2_FILE), scheme="iobes")
    with pytest.raises(ValueError, match="no such file"):
        tagging.read_conll(tmp_path / "missing.conll")


# ------------------------------------------------------------------------------ vocabularies


def test_word_vocabulary_keeps_case_counts_and_unknown():
    train = [[Sentence(("the", "The", "the", "EU"), ("O",) * 4), Sentence(("EU",), ("B-ORG",))]]
    vocab = tagging.WordVocabulary.build(train)  # min_count=2: "The" is unknown
    assert vocab.words == ("<pad>", "<unk>", "EU", "the")
    assert vocab.size == 4
    np.testing.assert_array_equal(vocab.encode(["the", "The", "EU", "Köln"]), [3, 1, 2, 1])
    assert vocab.encode([]).dtype == np.int32
    every = tagging.WordVocabulary.build(train, min_count=1)
    assert every.words == ("<pad>", "<unk>", "EU", "the", "The")
    with pytest.raises(ValueError, match="min_count"):
        tagging.WordVocabulary.build(train, min_count=0)


def test_character_ids_are_code_points_below_256():
    ids = tagging.CHARACTERS.encode(list("aé€\n"))
    np.testing.assert_array_equal(ids, [97, 233, tagging.SUBSTITUTE, 10])
    assert ids.dtype == np.int32
    with pytest.raises(ValueError, match="one character"):
        tagging.CHARACTERS.encode(["ab"])


def test_label_vocabulary_o_first_b_and_i_per_training_type():
    train = [[Sentence(("a", "b", "c"), ("B-PER", "O", "B-LOC"))]]
    labels = tagging.LabelVocabulary.build(train)
    assert labels.tags == ("O", "B-LOC", "I-LOC", "B-PER", "I-PER")
    assert labels.size == 5
    np.testing.assert_array_equal(labels.encode(["O", "I-PER", "B-LOC"]), [0, 4, 1])
    assert labels.decode(np.array([[3, 4], [0, 0]])) == ["B-PER", "I-PER", "O", "O"]
    with pytest.raises(ValueError, match="'B-MISC' is not in the label vocabulary"):
        labels.encode(["O", "B-MISC"])


def test_unseen_validation_type_names_document_and_sentence():
    train = [[Sentence(("EU",), ("B-ORG",))]]
    labels = tagging.LabelVocabulary.build(train)
    vocab = tagging.WordVocabulary.build(train, min_count=1)
    validation = [
        [Sentence(("EU",), ("B-ORG",))],
        [Sentence(("a",), ("O",)), Sentence(("Bonn",), ("B-LOC",))],
    ]
    for make in (tagging.pack_sentences, tagging.document_windows):
        with pytest.raises(ValueError, match=r"document 1, sentence 1: the tag 'B-LOC'"):
            make(validation, 8, vocab=vocab, labels=labels)


# ------------------------------------------------------------------------------ Python source

SNIPPET = '''\
# A comment, then code.
def f(x, *args):  # trailing
    """Doc
    string über €."""
    return x**2 + 0x1F + 1.5e-3j if x else f"{x!r:>{w}}"
match = [a for a in b"ab" if not a]
y = (1 +
     2) \\
    - 3
'''


def reference_pieces(text):
    """{(line, start col, end col, type): text} of each token's part on each line.

    Written from `tokenize` directly: STRING (and on Python >= 3.12 a whole f-string from its
    START to its END token) is string, NAME is keyword or name, COMMENT, NUMBER and OP.
    """
    lines = io.StringIO(text).readlines()
    tokens, depth, start = [], 0, None
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        name = tokenize.tok_name[token.type]
        if name.endswith("STRING_START"):
            depth += 1
            start = token.start if depth == 1 else start
        elif depth:
            depth -= name.endswith("STRING_END")
            if not depth:
                tokens.append(("string", start, token.end))
        elif name in ("STRING", "COMMENT", "NUMBER", "OP"):
            kind = {"STRING": "string", "COMMENT": "comment", "NUMBER": "number"}.get(name)
            tokens.append((kind or "operator", token.start, token.end))
        elif name == "NAME":
            kind = "keyword" if keyword.iskeyword(token.string) else "name"
            tokens.append((kind, token.start, token.end))
    pieces = {}
    for kind, (first_row, first_col), (last_row, last_col) in tokens:
        for row in range(first_row, last_row + 1):
            begin = first_col if row == first_row else 0
            end = last_col if row == last_row else len(lines[row - 1])
            pieces[row, begin, end, kind] = lines[row - 1][begin:end]
    return pieces


def labelled_spans(document):
    """{(line, start, end, type): text} of the spans the IOB2 tags mark."""
    return {
        (row, begin, end, kind): "".join(sentence.tokens[begin:end])
        for row, sentence in enumerate(document, start=1)
        for kind, begin, end in spans(sentence.tags)
    }


def test_snippet_spans_are_tokenize_tokens():
    document = tagging.tag_python_source(SNIPPET)
    found = labelled_spans(document)
    assert found == reference_pieces(SNIPPET)
    assert "".join("".join(s.tokens) for s in document) == SNIPPET
    # Spot checks written by hand.
    assert found[1, 0, 23, "comment"] == "# A comment, then code."
    assert found[2, 0, 3, "keyword"] == "def"
    assert found[3, 4, 11, "string"] == '"""Doc\n'  # a string over lines: one span a line
    assert found[4, 0, 21, "string"] == '    string über €."""'
    assert found[5, 12, 14, "operator"] == "**"
    assert found[5, 18, 22, "number"] == "0x1F"
    assert found[5, 25, 32, "number"] == "1.5e-3j"
    assert found[5, 43, 56, "string"] == 'f"{x!r:>{w}}"'  # an f-string is one string
    assert found[6, 0, 5, "name"] == "match"  # a soft keyword is a name
    assert found[6, 20, 25, "string"] == 'b"ab"'
    assert found[6, 29, 32, "keyword"] == "not"
    # The newline inside the docstring is string; the others, indentation and \ are O.
    assert document[2].tags[-1] == "I-string"
    assert document[1].tags[:3] == ("B-keyword", "I-keyword", "I-keyword")
    assert document[7].tags[-3:] == ("O", "O", "O")  # " \\\n"
    assert all(tag == "O" for tag in document[8].tags[:4])


def test_corpus_files_spans_are_tokenize_tokens(corpus):
    import sysconfig
    from pathlib import Path

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for split in ("train", "validation", "test"):
        documents, files = getattr(corpus, split), corpus.files[split]
        for index in (0, len(files) - 1):
            with tokenize.open(stdlib / files[index]) as f:
                text = f.read()
            document = documents[index]
            assert "".join("".join(s.tokens) for s in document) == text
            assert len(document) == len(io.StringIO(text).readlines())
            assert labelled_spans(document) == reference_pieces(text), files[index]


def test_corpus_is_deterministic_small_and_split_by_file(corpus):
    again = tagging.load_python_source()
    assert again.files == corpus.files
    assert again.test == corpus.test
    files = corpus.files
    selected = sorted(files["train"] + files["validation"] + files["test"])
    assert len(set(selected)) == len(selected) >= 10
    assert files["validation"] == tuple(selected[8::10])
    assert files["test"] == tuple(selected[9::10])
    assert all(not name.startswith("_") and name.endswith(".py") for name in selected)
    sizes = {
        split: sum(len(s.tokens) for d in getattr(corpus, split) for s in d) for split in files
    }
    assert sum(sizes.values()) <= 500_000
    assert all(size > 10_000 for size in sizes.values()), sizes
    types = tagging.LabelVocabulary.build(corpus.train).types
    assert types == tagging.PYTHON_TYPES


def test_load_skips_private_large_and_untokenizable_files(tmp_path):
    for i in range(11):
        (tmp_path / f"m{i:02d}.py").write_text(f"x{i} = {i}\n")
    (tmp_path / "m03.py").write_text('s = """never closed\n')  # tokenize fails
    (tmp_path / "m04.py").write_text("if x:\n        a\n    b\n")  # inconsistent dedent
    (tmp_path / "m05.py").write_text("x = 1\n" * 20)  # 120 characters: too large
    (tmp_path / "_private.py").write_text("p = 0\n")
    (tmp_path / "notes.txt").write_text("n = 0\n")
    for i in range(11, 14):
        (tmp_path / f"m{i:02d}.py").write_text(f"x{i} = {i}\n")
    corpus = tagging.load_python_source(tmp_path, max_file_chars=100)
    names = [f"m{i:02d}.py" for i in (0, 1, 2, 6, 7, 8, 9, 10, 11, 12, 13)]
    assert corpus.files == {
        "train": tuple(names[:8] + names[10:]),
        "validation": (names[8],),
        "test": (names[9],),
    }
    assert corpus.validation == [tagging.tag_python_source("x11 = 11\n")]
    # The budget ends the selection at the first file that would pass it.
    with pytest.raises(ValueError, match="needs at least 10"):
        tagging.load_python_source(tmp_path, max_file_chars=100, max_chars=50)
    with pytest.raises(ValueError, match="not a folder"):
        tagging.load_python_source(tmp_path / "missing")


def test_untokenizable_source_raises():
    with pytest.raises(ValueError, match="bad.py: Python's tokenize fails"):
        tagging.tag_python_source('s = """open\n', name="bad.py")
    with pytest.raises(ValueError, match="line 1: tokenize gives an error token '\\$'"):
        tagging.tag_python_source("a $ b\n")


# ------------------------------------------------------------------------------ windows, packing


def numbered_documents(sentence_lengths):
    """Documents of sentences whose tokens are all distinct, "d0s1t2", with varied tags."""
    documents = []
    for d, lengths in enumerate(sentence_lengths):
        document = []
        for s, n in enumerate(lengths):
            tokens = tuple(f"d{d}s{s}t{t}" for t in range(n))
            tags = tuple(["B-A", "I-A", "O", "B-B"][(d + s + t) % 4] for t in range(n))
            document.append(Sentence(tokens, tags))
        documents.append(document)
    return documents


LENGTHS = [[3, 5, 1], [9], [2, 2, 2, 2], [4, 7, 3, 1, 6]]


def setup_documents():
    documents = numbered_documents(LENGTHS)
    vocab = tagging.WordVocabulary.build(documents, min_count=1)
    labels = tagging.LabelVocabulary.build(documents)
    return documents, vocab, labels


def expected_stream(documents, vocab, labels):
    """Every (input id, label id) of the documents, in order, one token at a time."""
    return [
        (vocab.encode([token])[0], labels.encode([tag])[0])
        for document in documents
        for sentence in document
        for token, tag in zip(*sentence, strict=True)
    ]


def check_common(batch, length):
    assert set(batch) == {"inputs", "labels", "weights", "positions", "segment_ids"}
    for key, array in batch.items():
        assert array.shape == (len(batch["inputs"]), length)
        assert array.dtype == (np.float32 if key == "weights" else np.int32), key
    padding = batch["weights"] == 0
    np.testing.assert_array_equal(padding, batch["segment_ids"] == 0)
    assert set(np.unique(batch["weights"])) <= {0.0, 1.0}
    assert np.all(batch["inputs"][padding] == tagging.PAD_ID)
    assert np.all(batch["labels"][padding] == 0)
    # Padding only at the end of a row.
    assert np.all(np.diff(padding.astype(int), axis=1) >= 0)


@pytest.mark.parametrize("length", [1, 4, 8, 30])
def test_windows_cover_every_token_once_with_positions_0_to_l(length):
    documents, vocab, labels = setup_documents()
    batch = tagging.document_windows(documents, length, vocab=vocab, labels=labels)
    check_common(batch, length)
    real = batch["weights"] > 0
    stream = expected_stream(documents, vocab, labels)
    np.testing.assert_array_equal(batch["inputs"][real], [t[0] for t in stream])
    np.testing.assert_array_equal(batch["labels"][real], [t[1] for t in stream])
    np.testing.assert_array_equal(batch["positions"], np.tile(np.arange(length), (len(real), 1)))
    assert np.all(batch["segment_ids"][real] == 1)
    # Each window lies inside one document, and a document's windows are full but its last.
    words = np.array(vocab.words)
    row_documents = [
        {w.split("s")[0] for w in words[row[keep]]}
        for row, keep in zip(batch["inputs"], real, strict=True)
    ]
    assert all(len(docs) == 1 for docs in row_documents)
    sizes = [sum(n) for n in LENGTHS]
    assert len(real) == sum(-(-n // length) for n in sizes)
    for d, size in enumerate(sizes):
        rows = [i for i, docs in enumerate(row_documents) if docs == {f"d{d}"}]
        counts = real[rows].sum(axis=1).tolist()
        assert counts == [length] * (len(rows) - 1) + [size - length * (len(rows) - 1)]


@pytest.mark.parametrize("length", [3, 8, 12])
def test_packing_restarts_positions_at_each_sentence(length):
    documents, vocab, labels = setup_documents()
    batch = tagging.pack_sentences(documents, length, vocab=vocab, labels=labels)
    check_common(batch, length)
    real = batch["weights"] > 0
    stream = expected_stream(documents, vocab, labels)
    np.testing.assert_array_equal(batch["inputs"][real], [t[0] for t in stream])
    np.testing.assert_array_equal(batch["labels"][real], [t[1] for t in stream])
    np.testing.assert_array_equal(batch["positions"], positions_from_segments(batch["segment_ids"]))
    # Segments are numbered 1, 2, ... in each row; each is one sentence, or a piece of at
    # most `length` tokens of a longer one, and its positions count 0, 1, ...
    pieces = []
    for d, lengths in enumerate(LENGTHS):
        for s, n in enumerate(lengths):
            pieces += [(d, s)] * (-(-n // length))
    seen = []
    for row in range(len(real)):
        segments = batch["segment_ids"][row][real[row]]
        count = segments.max()
        np.testing.assert_array_equal(np.unique(segments), np.arange(1, count + 1))
        assert np.all(np.diff(segments) >= 0)
        for segment in range(1, count + 1):
            place = batch["segment_ids"][row] == segment
            np.testing.assert_array_equal(batch["positions"][row][place], np.arange(place.sum()))
            words = {vocab.words[i].split("t")[0] for i in batch["inputs"][row][place]}
            assert len(words) == 1 and place.sum() <= length
            seen.append(words.pop())
    assert seen == [f"d{d}s{s}" for d, s in pieces]
    if length == 12:  # first fit in order: [3,5,1] [9,2] [2,2,2,4] [7,3,1] [6]
        np.testing.assert_array_equal(real.sum(axis=1), [9, 11, 10, 11, 6])


def test_packing_with_continuing_positions():
    documents, vocab, labels = setup_documents()
    restart = tagging.pack_sentences(documents, 8, vocab=vocab, labels=labels)
    batch = tagging.pack_sentences(documents, 8, vocab=vocab, labels=labels, positions="continue")
    check_common(batch, 8)
    np.testing.assert_array_equal(
        batch["positions"], np.tile(np.arange(8), (len(batch["inputs"]), 1))
    )
    for key in ("inputs", "labels", "weights", "segment_ids"):
        np.testing.assert_array_equal(batch[key], restart[key])
    assert not np.array_equal(batch["positions"], restart["positions"])
    with pytest.raises(ValueError, match="positions must be one of"):
        tagging.pack_sentences(documents, 8, vocab=vocab, labels=labels, positions="random")
    with pytest.raises(ValueError, match="length must be an integer"):
        tagging.document_windows(documents, 0, vocab=vocab, labels=labels)
    with pytest.raises(ValueError, match="pass \\[document\\]"):
        tagging.pack_sentences(documents[0], 8, vocab=vocab, labels=labels)


def test_python_corpus_windows_and_packing_keep_every_character(corpus):
    labels = tagging.LabelVocabulary(tagging.PYTHON_TYPES)
    documents = corpus.validation
    text = "".join("".join(s.tokens) for d in documents for s in d)
    for batch in (
        tagging.document_windows(documents, 256, vocab=tagging.CHARACTERS, labels=labels),
        tagging.pack_sentences(documents, 64, vocab=tagging.CHARACTERS, labels=labels),
    ):
        real = batch["weights"] > 0
        assert real.sum() == len(text)
        np.testing.assert_array_equal(batch["inputs"][real], tagging.CHARACTERS.encode(list(text)))


# ------------------------------------------------------------------------------ evaluation

LABELS = tagging.LabelVocabulary(("LOC", "MISC", "ORG", "PER"))


def as_batch(rows, length=12):
    """Rows of sentences of (gold tag, predicted tag) pairs, packed with segment ids; padding
    gets a predicted entity that must be ignored."""
    gold = np.zeros((len(rows), length), np.int32)
    predicted = np.full((len(rows), length), LABELS.tags.index("B-PER"), np.int32)
    segments = np.zeros((len(rows), length), np.int32)
    for r, sentences in enumerate(rows):
        used = 0
        for s, pairs in enumerate(sentences, start=1):
            gold[r, used : used + len(pairs)] = LABELS.encode([g for g, _ in pairs])
            predicted[r, used : used + len(pairs)] = LABELS.encode([p for _, p in pairs])
            segments[r, used : used + len(pairs)] = s
            used += len(pairs)
    return gold, predicted, (segments > 0).astype(np.float32), segments


# One PER right, one LOC predicted as ORG (a wrong type), one ORG missed.
HAND = [
    [
        [("B-PER", "B-PER"), ("I-PER", "I-PER"), ("O", "O"), ("B-LOC", "B-ORG")],
        [("O", "O"), ("B-ORG", "O"), ("I-ORG", "O")],
    ],
    [[("O", "O"), ("O", "O")]],
]


@pytest.mark.parametrize("mode", ["default", "strict"])
def test_metric_by_hand(mode):
    gold, predicted, weights, segments = as_batch(HAND)
    result = tagging.evaluate(gold, predicted, labels=LABELS, weights=weights, segment_ids=segments)
    json.dumps(result)  # JSON-ready
    assert result["sentences"] == 3 and result["tokens"] == 9
    scores = result[mode]
    # 3 gold entities, 2 predicted, 1 correct.
    assert scores["precision"] == pytest.approx(1 / 2)
    assert scores["recall"] == pytest.approx(1 / 3)
    assert scores["f1"] == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))
    assert scores["support"] == 3
    zero = {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert scores["per_type"] == {
        "PER": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1},
        "LOC": {**zero, "support": 1},  # missed: predicted as ORG
        "ORG": {**zero, "support": 1},  # one wrong prediction, one miss
        "MISC": {**zero, "support": 0},  # in the vocabulary, never seen
    }


def test_strict_and_default_differ_on_a_span_opened_by_i():
    # Gold B-LOC I-LOC; predicted I-LOC I-LOC: conlleval counts the entity, strict IOB2 not.
    gold, predicted, weights, segments = as_batch(
        [[[("B-LOC", "I-LOC"), ("I-LOC", "I-LOC"), ("O", "O")]]]
    )
    result = tagging.evaluate(gold, predicted, labels=LABELS, weights=weights, segment_ids=segments)
    assert result["default"]["f1"] == 1.0
    assert result["default"]["per_type"]["LOC"]["precision"] == 1.0
    assert result["strict"]["precision"] == 0.0
    assert result["strict"]["recall"] == 0.0
    assert result["strict"]["f1"] == 0.0
    assert result["strict"]["support"] == 1


def test_segments_separate_sentences():
    # Two one-token sentences in a row. Predicted "B-LOC | I-LOC": in its own sentence the
    # I-LOC is an entity (default mode); read as one row it would continue the first.
    gold, predicted, weights, segments = as_batch([[[("B-LOC", "B-LOC")], [("B-LOC", "I-LOC")]]])
    by_sentence = tagging.evaluate(
        gold, predicted, labels=LABELS, weights=weights, segment_ids=segments
    )
    assert by_sentence["default"]["f1"] == 1.0
    assert by_sentence["strict"]["recall"] == pytest.approx(1 / 2)
    by_row = tagging.evaluate(gold, predicted, labels=LABELS, weights=weights)
    assert by_row["sentences"] == 1
    assert by_row["default"]["recall"] == 0.0


def test_metric_on_packed_python_source_matches_seqeval(corpus):
    from seqeval.metrics import f1_score, precision_score, recall_score
    from seqeval.scheme import IOB2

    labels = tagging.LabelVocabulary(tagging.PYTHON_TYPES)
    document = corpus.test[0]
    batch = tagging.pack_sentences([document], 128, vocab=tagging.CHARACTERS, labels=labels)
    gold, weights, segments = batch["labels"], batch["weights"], batch["segment_ids"]
    result = tagging.evaluate(gold, gold, labels=labels, weights=weights, segment_ids=segments)
    num_spans = sum(tag.startswith("B-") for sentence in document for tag in sentence.tags)
    for mode in ("default", "strict"):
        assert result[mode]["f1"] == 1.0
        assert result[mode]["support"] == num_spans
    assert result["sentences"] == len(document)  # no line is longer than 128

    # Every 7th character predicted I-name: the scores equal seqeval's on the sentences
    # taken from the document itself, not from the packed rows.
    real = weights > 0
    flat = gold[real].copy()
    flat[::7] = labels.tags.index("I-name")
    predicted = gold.copy()
    predicted[real] = flat
    result = tagging.evaluate(gold, predicted, labels=labels, weights=weights, segment_ids=segments)
    tags = labels.decode(flat)
    y_true, y_pred, used = [], [], 0
    for sentence in document:
        y_true.append(list(sentence.tags))
        y_pred.append(tags[used : used + len(sentence.tags)])
        used += len(sentence.tags)
    for mode, options in (("default", {}), ("strict", {"mode": "strict", "scheme": IOB2})):
        scores = result[mode]
        assert 0.2 < scores["f1"] < 0.9
        assert scores["f1"] == pytest.approx(f1_score(y_true, y_pred, **options))
        assert scores["precision"] == pytest.approx(precision_score(y_true, y_pred, **options))
        assert scores["recall"] == pytest.approx(recall_score(y_true, y_pred, **options))
    assert result["strict"]["precision"] != result["default"]["precision"]


def test_metric_bad_arguments():
    gold, predicted, weights, segments = as_batch(HAND)
    with pytest.raises(ValueError, match="share a shape"):
        tagging.evaluate(gold[:1], predicted, labels=LABELS, weights=weights)
    with pytest.raises(ValueError, match=r"predicted must hold label ids in \[0, 9\)"):
        tagging.evaluate(gold, predicted + 9, labels=LABELS, weights=weights)
    with pytest.raises(ValueError, match="integer dtype"):
        tagging.evaluate(gold, predicted.astype(float), labels=LABELS, weights=weights)
