"""Tests for jpe.lab.tagger and train/tag.py: packing, a few-step run, resume, CLI errors."""

import json

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jpe
from jpe.lab import tagging
from jpe.lab.tagger import TagConfig, train_tagger
from jpe.nn.transformer import Transformer
from train import tag as tag_cli

ROW = 24
# Five lines of 8 characters each: rows of 24 hold three sentences, then two.
SOURCE = "x = 123\nif y: z\ns = 'a'\n# notes\ndel x,y\n"


def encoder(pe):
    options = {"npos": 16} if pe == "cope" else None
    config = jpe.TransformerConfig(
        pe=pe, pe_options=options, vocab_size=256, d_model=16, num_heads=2, num_layers=2,
        causal=False, max_len=64, num_classes=13,
    )  # fmt: skip
    return Transformer(config, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("pe", jpe.ENCODINGS)
def test_packed_rows_with_restarted_positions_equal_separate_sentences(pe):
    """BERT-style explicit position ids: each packed sentence gets the logits it gets alone."""
    model = encoder(pe)
    limit = model.config.encoding.position_limit(model.config)
    if limit is not None and limit < ROW:
        pytest.skip(f"{pe} holds {limit} positions, fewer than a row")
    document = tagging.tag_python_source(SOURCE)
    labels = tagging.LabelVocabulary(tagging.PYTHON_TYPES)
    rows = tagging.pack_sentences([document], ROW, vocab=tagging.CHARACTERS, labels=labels)
    np.testing.assert_array_equal(rows["segment_ids"].max(axis=1), [3, 2])
    packed = model(
        jnp.asarray(rows["inputs"]),
        positions=jnp.asarray(rows["positions"]),
        segment_ids=jnp.asarray(rows["segment_ids"]),
    )  # [2, 24, classes]
    # Each sentence alone: one row each, no padding, positions 0..7.
    alone = model(jnp.asarray(np.stack([tagging.CHARACTERS.encode(s.tokens) for s in document])))
    chex.assert_shape(alone, (5, 8, 13))
    kept = rows["weights"] > 0
    chex.assert_trees_all_close(packed[kept].reshape(alone.shape), alone, atol=1e-4, rtol=1e-4)


def test_continued_positions_change_an_absolute_encoding():
    """The check above can fail: continued positions move a later sentence's embeddings."""
    model = encoder("sinusoidal")
    document = tagging.tag_python_source(SOURCE)
    labels = tagging.LabelVocabulary(tagging.PYTHON_TYPES)
    kw = dict(vocab=tagging.CHARACTERS, labels=labels)
    restart = tagging.pack_sentences([document], ROW, positions="restart", **kw)
    cont = tagging.pack_sentences([document], ROW, positions="continue", **kw)
    run = lambda r: model(r["inputs"], positions=r["positions"], segment_ids=r["segment_ids"])  # noqa: E731
    assert not np.allclose(run(restart), run(cont), atol=1e-3)


CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O
to TO B-VP O
boycott VB I-VP O
British JJ B-NP B-MISC
lamb NN I-NP O
. . O O

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER

BRUSSELS NNP B-NP B-LOC
1996-08-22 CD I-NP O
"""

TINY = dict(pe="rope", d_model=16, num_layers=1, num_heads=2, seq_len=8, steps=3, batch_size=4,
            eval_multiples=(1, 2, 4), checkpoint_every=3, log_every=1)  # fmt: skip


@pytest.fixture
def conll(tmp_path):
    (tmp_path / "train.txt").write_text(CONLL * 3)
    (tmp_path / "valid.txt").write_text(CONLL)
    return tmp_path / "train.txt"


def test_few_steps_write_eval_json_and_a_rerun_resumes(conll, tmp_path):
    config = TagConfig(**TINY, data=str(conll))
    workdir = tmp_path / "run"
    first = train_tagger(config, workdir, progress=False)
    assert first["start_step"] == 0 and [r["step"] for r in first["losses"]] == [1, 2, 3]
    report = json.loads((workdir / "eval.json").read_text())
    assert report["pe"] == "rope" and report["seq_len"] == 8
    for key in ("f1", "f1_strict", "per_type"):
        assert list(report[key]) == ["8", "16", "32"], key
    assert all(0.0 <= f <= 1.0 for f in report["f1"].values())
    assert set(report["per_type"]["8"]) == {"LOC", "MISC", "ORG", "PER"}
    assert report["eval"] == str(conll.with_name("valid.txt"))

    second = train_tagger(config, workdir, progress=False)
    assert second["start_step"] == 3 and second["losses"] == []  # resumed, nothing retrained
    chex.assert_trees_all_close(
        nnx.state(second["model"], nnx.Param), nnx.state(first["model"], nnx.Param)
    )
    assert json.loads((workdir / "eval.json").read_text())["f1"] == report["f1"]
    with pytest.raises(ValueError, match="different configuration"):
        train_tagger(config.replace(lr=1e-2), workdir, progress=False)


def test_packed_run_reports_packed_scores(conll, tmp_path):
    config = TagConfig(
        **{**TINY, "steps": 1, "eval_multiples": (1,)},
        data=str(conll),
        pack=True,
        positions="continue",
    )
    report = train_tagger(config, tmp_path / "run", progress=False)["eval"]
    assert report["positions"] == "continue" and set(report["f1_packed"]) == {"default", "strict"}


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="max_len"):
        TagConfig(pe="learned", seq_len=16, max_len=64)  # 8 x 16 = 128 positions needed
    TagConfig(pe="learned", seq_len=16, max_len=128)
    with pytest.raises(ValueError, match="positions"):
        TagConfig(positions="shuffle")
    with pytest.raises(ValueError, match="eval_multiples"):
        TagConfig(eval_multiples=(1, 0))
    (tmp_path / "words.conll").write_text(CONLL)
    with pytest.raises(ValueError, match="'train'"):
        train_tagger(TagConfig(**TINY, data=str(tmp_path / "words.conll")), tmp_path / "w")
    (tmp_path / "eng.train").write_text(CONLL)
    with pytest.raises(ValueError, match="eng.testa"):
        train_tagger(TagConfig(**TINY, data=str(tmp_path / "eng.train")), tmp_path / "w2")


def test_cli_bad_flags_exit_2_with_the_reason(tmp_path, capsys):
    assert tag_cli.main(["--pe=nope", f"--workdir={tmp_path}"]) == 2
    assert "error:" in capsys.readouterr().err
    missing = tmp_path / "missing" / "train.conll"
    assert tag_cli.main([f"--data={missing}", f"--workdir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and str(missing) in err
