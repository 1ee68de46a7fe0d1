"""Tests for jpe.lab.data: text sources, the split, resumable batches, packing, eval windows."""

import json
import sys
import types

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jpe.encodings.positions import positions_from_segments
from jpe.lab import data

END = bytes([data.DOC_END])


def random_text_bytes(rng, n):
    """n random bytes, never DOC_END, so windows of a few bytes are unique in the text."""
    return rng.integers(0, data.DOC_END, size=n, dtype=np.uint8)


def joined(docs: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Reference concatenation: each document followed by DOC_END; the starts by a loop."""
    tokens, starts, offset = bytearray(), [], 0
    for doc in docs:
        starts.append(offset)
        tokens += doc + END
        offset += len(doc) + 1
    return np.frombuffer(tokens, np.uint8), np.array(starts)


# ------------------------------------------------------------------------------ load_text


def test_builtin_corpus_is_python_docs_text():
    docs = data.load_text()
    from pydoc_data.topics import topics

    assert docs == [topics[k] for k in sorted(topics)]
    assert len(docs) > 50 and all(doc.strip() for doc in docs)
    raw = b"".join(doc.encode("utf-8") for doc in docs)
    assert len(raw) > 300_000  # 466,117 bytes on CPython 3.11.7
    assert data.DOC_END not in raw  # 0xFF never occurs in UTF-8
    assert sum(b < 128 for b in raw) / len(raw) > 0.99  # English, almost all ASCII
    assert "assert" in docs[0]


def test_file_is_one_document(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("héllo\nworld\n", encoding="utf-8")
    assert data.load_text(str(path)) == ["héllo\nworld\n"]
    assert data.load_text(path) == ["héllo\nworld\n"]


def test_folder_recursive_sorted_by_relative_path_skipping_hidden_and_blank(tmp_path):
    files = {"b.txt": "B", "a/z.txt": "AZ", "a/b/c.txt": "ABC", "a0.txt": "A0"}
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / ".hidden.txt").write_text("hidden")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config").write_text("hidden")
    (tmp_path / "a" / "empty.txt").write_text("")
    (tmp_path / "a" / "blank.txt").write_text(" \n\t")
    # Sorted by relative path: a/b/c.txt < a/z.txt < a0.txt < b.txt.
    assert data.load_text(str(tmp_path)) == ["ABC", "AZ", "A0", "B"]


def _write(tmp_path, name, content: bytes):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: p / "missing.txt", r"missing\.txt.*does not exist"),
        (lambda p: _write(p, "empty.txt", b""), r"empty\.txt.*is empty"),
        (lambda p: _write(p, "ws.txt", b" \n\t\r\n"), r"ws\.txt.*only whitespace"),
        (lambda p: _write(p, "d/.hidden", b"x").parent, r"holds no files"),
        (lambda p: _write(p, "d/a.txt", b"\n").parent, r"every file .* empty"),
        (lambda p: _write(p, "bad.txt", b"hello \xff world"), r"bad\.txt.*0xff.*offset 6\b"),
        (lambda p: _write(p, "d/x/bad.bin", b"ok\n\xc3("), r"bad\.bin.*0xc3.*offset 3\b"),
    ],
    ids=["missing", "empty", "whitespace", "no-files", "blank-files", "non-utf8", "folder-bad"],
)
def test_load_text_errors_name_the_path(tmp_path, make, match):
    path = make(tmp_path)
    with pytest.raises(ValueError, match=match):
        data.load_text(str(path))


def test_hf_without_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(ValueError, match=r"hf:roneneldan/TinyStories.*not installed.*pip install"):
        data.load_text("hf:roneneldan/TinyStories")


def test_hf_not_cached_names_the_data_set_and_stays_offline(monkeypatch):
    seen = {}

    def load_dataset(name, config, split):
        import os

        seen.update(offline=os.environ["HF_DATASETS_OFFLINE"], args=(name, config, split))
        raise ConnectionError("offline mode is enabled")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(ValueError, match=r"'wikitext'.*'wikitext-2-raw-v1'.*local cache"):
        data.load_text("hf:wikitext:wikitext-2-raw-v1")
    assert seen == {"offline": "1", "args": ("wikitext", "wikitext-2-raw-v1", "train")}


def test_hf_text_column_rows_are_documents(monkeypatch):
    class Rows:
        column_names = ["text", "id"]

        def __getitem__(self, key):
            return {"text": ["one", "", "  ", "two"]}[key]

    fake = types.SimpleNamespace(load_dataset=lambda name, config, split: Rows())
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert data.load_text("hf:some/set") == ["one", "two"]


# ------------------------------------------------------------------------------ encode/decode


@given(st.text())
def test_encode_decode_round_trip(text):
    tokens = data.encode(text)
    assert tokens.dtype == np.uint8 and tokens.shape == (len(text.encode("utf-8")),)
    assert data.decode(tokens) == text
    assert data.decode(tokens.astype(np.int32).tolist()) == text


@given(st.binary())
def test_decode_never_raises_on_bytes(raw):
    assert data.decode(np.frombuffer(raw, np.uint8)) == raw.decode("utf-8", errors="replace")


def test_decode_rejects_non_bytes():
    assert data.decode([104, data.DOC_END, 105]) == "h\ufffdi"
    with pytest.raises(ValueError, match=r"tokens must hold values in \[0, 256\)"):
        data.decode([104, 256])
    with pytest.raises(ValueError, match="integer dtype"):
        data.decode(np.array([1.0]))


# ------------------------------------------------------------------------------ split


def test_split_is_deterministic_complete_and_cut_at_a_document():
    docs = [f"document {i}: " + "x" * (37 * i % 101) for i in range(200)]
    a = data.split_documents(docs, val_fraction=0.1)
    b = data.split_documents(docs, val_fraction=0.1)
    for field in ("train", "val", "train_doc_starts", "val_doc_starts"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    tokens, starts = joined([d.encode() for d in docs])
    # No overlap, nothing lost: train then val is the whole text.
    np.testing.assert_array_equal(np.concatenate([a.train, a.val]), tokens)
    cut = len(a.train)
    assert cut in starts  # a document boundary
    requested = round(0.1 * len(tokens))
    assert requested <= len(a.val) <= 2 * requested
    np.testing.assert_array_equal(a.train_doc_starts, starts[starts < cut])
    np.testing.assert_array_equal(a.val_doc_starts, starts[starts >= cut] - cut)
    assert a.train.dtype == a.val.dtype == np.uint8


def test_split_cuts_inside_a_single_document():
    corpus = data.split_documents(["abcdefghij" * 10], val_fraction=0.2)
    assert data.decode(np.concatenate([corpus.train, corpus.val])) == "abcdefghij" * 10 + "\ufffd"
    assert len(corpus.val) == round(0.2 * 101)
    np.testing.assert_array_equal(corpus.train_doc_starts, [0])
    np.testing.assert_array_equal(corpus.val_doc_starts, [0])


def test_split_cuts_inside_a_long_last_document():
    docs = ["short"] * 10 + ["long " * 200]
    corpus = data.split_documents(docs, val_fraction=0.1)
    total = sum(len(d) + 1 for d in docs)
    assert len(corpus.val) == round(0.1 * total)  # the last boundary would give ~90%


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"val_fraction": 1.0}, r"val_fraction must be a number in \(0, 1\)"),
        ({"val_fraction": -0.5}, "val_fraction"),
        ({"val_fraction": "0.1"}, "val_fraction"),
        ({"min_len": 0}, "min_len"),
        ({"min_len": 50}, r"validation, fewer than min_len=50"),
        ({"val_fraction": 0.99, "min_len": 5}, r"training, fewer than min_len=5"),
    ],
)
def test_split_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.split_documents(["a" * 100, "b" * 100], **kwargs)


def test_split_rejects_no_documents():
    with pytest.raises(ValueError, match="at least one document"):
        data.split_documents([])
    with pytest.raises(ValueError, match="sequence of strings"):
        data.split_documents("one string")


def test_load_corpus_builtin():
    corpus = data.load_corpus(min_len=4097)
    assert len(corpus.val) >= 0.05 * (len(corpus.train) + len(corpus.val))
    assert corpus.train[-1] == data.DOC_END and corpus.val[-1] == data.DOC_END
    assert np.all(corpus.train[corpus.train_doc_starts[1:] - 1] == data.DOC_END)


# ------------------------------------------------------------------------------ batches


@pytest.fixture(scope="module")
def stream():
    return random_text_bytes(np.random.default_rng(0), 20_000)


def test_window_batches_are_shifted_windows_of_the_text(stream):
    batch = data.Batches(stream, batch_size=6, seq_len=64, seed=3).batch(7)
    assert set(batch) == {"inputs", "targets", "weights"}
    for key, dtype in [("inputs", np.int32), ("targets", np.int32), ("weights", np.float32)]:
        assert batch[key].shape == (6, 64) and batch[key].dtype == dtype
    np.testing.assert_array_equal(batch["weights"], 1.0)
    text = stream.tobytes()
    for inputs, targets in zip(batch["inputs"], batch["targets"], strict=True):
        start = text.find(inputs.astype(np.uint8).tobytes())
        assert start >= 0
        np.testing.assert_array_equal(targets, stream[start + 1 : start + 65])


def test_windows_reach_both_ends_of_the_text():
    tokens = np.arange(10, dtype=np.uint8)  # seq_len 8: starts 0 and 1 only
    batches = data.Batches(tokens, batch_size=4, seq_len=8, seed=0)
    firsts = {int(x) for s in range(20) for x in batches.batch(s)["inputs"][:, 0]}
    assert firsts == {0, 1}


@pytest.mark.parametrize("pack", [False, True])
def test_batches_are_a_function_of_seed_and_step(stream, pack):
    kwargs = dict(batch_size=4, seq_len=32, pack=pack, doc_starts=np.arange(0, 20_000, 500))
    a, b = data.Batches(stream, seed=1, **kwargs), data.Batches(stream, seed=1, **kwargs)
    other_seed = data.Batches(stream, seed=2, **kwargs)
    for key in a.batch(0):
        np.testing.assert_array_equal(a.batch(5)[key], b.batch(5)[key])
    assert not np.array_equal(a.batch(5)["inputs"], a.batch(6)["inputs"])
    assert not np.array_equal(a.batch(5)["inputs"], other_seed.batch(5)["inputs"])


@pytest.mark.parametrize("pack", [False, True])
def test_resume_reproduces_an_uninterrupted_run(stream, pack):
    kwargs = dict(batch_size=4, seq_len=32, seed=7, pack=pack, doc_starts=[0, 300, 5000])
    run = data.Batches(stream, **kwargs)
    uninterrupted = [next(run) for _ in range(10)]
    first = data.Batches(stream, **kwargs)
    resumed = [next(first) for _ in range(5)]
    state = json.loads(json.dumps(first.state()))
    assert state["step"] == 5 and state["seed"] == 7
    second = data.Batches(stream, **kwargs).restore(state)
    resumed += [next(second) for _ in range(5)]
    assert second.step == 10
    for x, y in zip(uninterrupted, resumed, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    assert first.state(3)["step"] == 3


def test_restore_refuses_another_stream(stream):
    state = data.Batches(stream, batch_size=4, seq_len=32, seed=1).state()
    with pytest.raises(ValueError, match="seed=1"):
        data.Batches(stream, batch_size=4, seq_len=32, seed=2).restore(state)
    with pytest.raises(ValueError, match="num_tokens"):
        data.Batches(stream[:-1], batch_size=4, seq_len=32, seed=1).restore(state)
    with pytest.raises(ValueError, match="state"):
        data.Batches(stream, batch_size=4, seq_len=32, seed=1).restore({"seed": 1})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"batch_size": 2.0}, "batch_size"),
        ({"seq_len": 0}, "seq_len must be an integer >= 1"),
        ({"seq_len": 100}, r"seq_len \+ 1 = 101"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"pack": True}, "doc_starts"),
        ({"pack": True, "doc_starts": [1, 5]}, "doc_starts must .* begins with 0"),
        ({"pack": True, "doc_starts": [0, 5, 5]}, "doc_starts"),
        ({"pack": True, "doc_starts": [0, 50]}, "doc_starts"),
        ({"pack": 1}, "pack must be True or False"),
    ],
)
def test_batches_errors(kwargs, match):
    args = {"batch_size": 2, "seq_len": 8, **kwargs}
    with pytest.raises(ValueError, match=match):
        data.Batches(np.zeros(50, np.uint8), **args)


# ------------------------------------------------------------------------------ packing


def reference_pieces(tokens, starts, seq_len) -> set[bytes]:
    """Each document cut into pieces of <= L + 1 bytes starting every L bytes (a plain loop)."""
    ends = list(starts[1:]) + [len(tokens)]
    pieces = set()
    for start, end in zip(starts, ends, strict=True):
        for s in range(start, end - 1, seq_len):
            pieces.add(tokens[s : min(s + seq_len + 1, end)].tobytes())
    return pieces


def test_packing_rows_hold_whole_pieces_with_restarting_positions():
    rng = np.random.default_rng(1)
    seq_len = 24
    lengths = [1, 2, 3, 5, 9, 24, 25, 26, 49, 70, 100, 7, 13]  # around and across a row
    tokens, starts = joined([random_text_bytes(rng, n).tobytes() for n in lengths])
    pieces = reference_pieces(tokens, starts, seq_len)
    batches = data.Batches(
        tokens, batch_size=8, seq_len=seq_len, seed=0, pack=True, doc_starts=starts
    )
    seen = set()
    for step in range(15):
        batch = batches.batch(step)
        for key in ("inputs", "targets", "segment_ids", "positions"):
            assert batch[key].shape == (8, seq_len) and batch[key].dtype == np.int32
        assert batch["weights"].dtype == np.float32
        np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
        np.testing.assert_array_equal(
            batch["positions"], np.asarray(positions_from_segments(batch["segment_ids"]))
        )
        for r in range(8):
            seg = batch["segment_ids"][r]
            row = np.append(batch["inputs"][r], batch["targets"][r, -1]).astype(np.uint8)
            weights = batch["weights"][r]
            # Segment ids 1, 2, 3, ... from the start of the row, then padding (0) to the end.
            real = seg[seg > 0]
            assert seg[0] == 1 and np.all(np.diff(real) >= 0) and np.all(np.diff(real) <= 1)
            assert np.all(seg[len(real) :] == 0) and np.all(row[len(real) + 1 :] == 0)
            for k in range(1, real.max() + 1):
                (where,) = np.nonzero(seg == k)
                a, b = where[0], where[-1] + 1
                np.testing.assert_array_equal(batch["positions"][r, a:b], np.arange(b - a))
                # Targets inside the piece weigh 1; the one crossing into the next piece 0.
                np.testing.assert_array_equal(weights[a : b - 1], 1.0)
                ends_row = b == seq_len and weights[-1] == 1
                piece = row[a : b + 1] if ends_row else row[a:b]
                if not ends_row:
                    assert weights[b - 1] == 0
                assert piece.tobytes() in pieces  # from the corpus, in order, whole
                seen.add(piece.tobytes())
            np.testing.assert_array_equal(weights[seg == 0], 0.0)
    assert len(seen) > len(pieces) // 2


def test_packing_fills_rows_from_the_builtin_corpus():
    corpus = data.load_corpus()
    batches = data.Batches(
        corpus.train,
        batch_size=16,
        seq_len=256,
        seed=0,
        pack=True,
        doc_starts=corpus.train_doc_starts,
    )
    batch = batches.batch(0)
    assert (batch["segment_ids"] > 0).mean() > 0.95  # little padding
    assert batch["weights"].mean() > 0.95


# ------------------------------------------------------------------------------ eval windows


def distinct_tokens(n):
    """n <= 256 distinct byte values in a fixed random order: a token's value gives its index."""
    return np.random.default_rng(n).permutation(256)[:n].astype(np.uint8)


def coverage(tokens, windows, length):
    """How often each token is scored as a target, and each window's begin."""
    lookup = np.zeros(256, np.int64)  # value -> index (values are distinct)
    lookup[tokens] = np.arange(len(tokens))
    begins = lookup[windows["inputs"][:, 0]]
    counts = np.zeros(len(tokens))
    for begin, inputs, targets, weights in zip(
        begins, windows["inputs"], windows["targets"], windows["weights"], strict=True
    ):
        np.testing.assert_array_equal(inputs, tokens[begin : begin + length])
        np.testing.assert_array_equal(targets, tokens[begin + 1 : begin + length + 1])
        counts[begin + 1 : begin + length + 1] += weights
    return counts, begins


@given(st.integers(2, 256), st.data())
def test_eval_windows_score_every_target_once(n, draw):
    length = draw.draw(st.integers(1, n - 1))
    stride = draw.draw(st.one_of(st.none(), st.integers(1, length)))
    tokens = distinct_tokens(n)
    windows = data.eval_windows(tokens, length, stride=stride)
    assert windows["inputs"].shape == windows["weights"].shape == (len(windows["inputs"]), length)
    assert windows["inputs"].dtype == np.int32 and windows["weights"].dtype == np.float32
    assert set(np.unique(windows["weights"])) <= {0.0, 1.0}
    counts, begins = coverage(tokens, windows, length)
    assert counts[0] == 0 and np.all(counts[1:] == 1)
    assert begins[0] == 0 and np.all(windows["weights"][0] == 1)
    # After the first window, each scored target has at least length - stride tokens of
    # context before its input (place j in the window has j).
    _, places = np.nonzero(windows["weights"][1:])
    assert np.all(places >= length - (stride or length))


def test_eval_windows_non_overlapping_and_sliding_layouts():
    tokens = distinct_tokens(101)
    windows = data.eval_windows(tokens, 25)
    _, begins = coverage(tokens, windows, 25)
    np.testing.assert_array_equal(begins, [0, 25, 50, 75])  # 100 targets, 4 windows
    windows = data.eval_windows(tokens, 40, stride=10)
    _, begins = coverage(tokens, windows, 40)
    np.testing.assert_array_equal(begins, [0, 10, 20, 30, 40, 50, 60])
    np.testing.assert_array_equal(windows["weights"][1:].sum(1), 10)
    windows = data.eval_windows(tokens, 40, stride=15)  # a last window aligned to the end
    _, begins = coverage(tokens, windows, 40)
    np.testing.assert_array_equal(begins, [0, 15, 30, 45, 60])
    np.testing.assert_array_equal(windows["weights"].sum(1), [40, 15, 15, 15, 15])


def test_eval_windows_max_windows_evenly_spaced_subset():
    tokens = distinct_tokens(201)
    full = data.eval_windows(tokens, 10, stride=5)
    capped = data.eval_windows(tokens, 10, stride=5, max_windows=5)
    counts, begins = coverage(tokens, capped, 10)
    assert len(begins) == 5 and begins[0] == 0 and counts.max() == 1
    full_begins = coverage(tokens, full, 10)[1]
    keep = np.round(np.linspace(0, len(full_begins) - 1, 5)).astype(int)
    np.testing.assert_array_equal(begins, full_begins[keep])
    np.testing.assert_array_equal(capped["weights"], full["weights"][keep])
    assert len(data.eval_windows(tokens, 10, max_windows=1000)["inputs"]) == 20


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"length": 100}, r"length \+ 1 = 101"),
        ({"length": 0}, "length must be an integer >= 1"),
        ({"length": 10, "stride": 0}, "stride must be an integer >= 1"),
        ({"length": 10, "stride": 11}, r"stride must be None or an integer in \[1, length=10\]"),
        ({"length": 10, "max_windows": 0}, "max_windows"),
    ],
)
def test_eval_windows_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.eval_windows(np.zeros(100, np.uint8), **kwargs)
