"""The ViT (`jpe.nn.vision`), its data and trainer (`jpe.lab.vision`) and `train/vit.py`."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import jpe
from jpe.lab import vision
from jpe.lab.vision import VisionConfig
from jpe.nn.vision import VisionTransformer, patchify
from train import vit as vit_cli

TWO_D = ["none", "sinusoidal-2d", "learned-2d", "rope-2d", "rope-mixed", "alibi-2d"]
TINY = dict(d_model=16, num_heads=2, num_layers=1, batch_size=8, log_every=2, eval_limit=64)


def model(pe, grid=4, channels=1, seed=0):
    config = jpe.TransformerConfig(
        pe=pe, d_model=16, num_heads=2, num_layers=1, causal=False, num_classes=3, max_len=grid
    )
    return VisionTransformer(config, patch_size=2, channels=channels, rngs=nnx.Rngs(seed))


def test_patchify_is_row_major_and_checks_the_sides():
    images = jnp.arange(2 * 4 * 6 * 1, dtype=jnp.float32).reshape(2, 4, 6, 1)
    patches, grid = patchify(images, 2)
    assert grid == (2, 3)
    chex.assert_shape(patches, (2, 6, 4))
    # patch (row 1, column 2) holds pixels rows 2-3, columns 4-5
    np.testing.assert_array_equal(patches[0, 5], images[0, 2:4, 4:6, 0].reshape(-1))
    with pytest.raises(ValueError, match="do not divide into 2x2 patches"):
        patchify(jnp.zeros((1, 5, 6, 1)), 2)
    with pytest.raises(ValueError, match=r"images must have shape \[B, H, W, C\]"):
        patchify(jnp.zeros((5, 6, 1)), 2)


@pytest.mark.parametrize("pe", TWO_D)
def test_every_2d_encoding_classifies_images_of_any_size(pe):
    m = model(pe)
    for height, width in [(8, 8), (12, 16)]:
        logits = m(jax.random.normal(jax.random.PRNGKey(0), (2, height, width, 1)))
        chex.assert_shape(logits, (2, 3))
        chex.assert_tree_all_finite(logits)


def test_vision_model_needs_an_encoder_with_classes():
    with pytest.raises(ValueError, match="causal=False"):
        VisionTransformer(jpe.TransformerConfig(pe="rope-2d", num_classes=3), patch_size=2,
                          channels=1, rngs=nnx.Rngs(0))  # fmt: skip
    with pytest.raises(ValueError, match="num_classes"):
        VisionTransformer(jpe.TransformerConfig(pe="rope-2d", causal=False), patch_size=2,
                          channels=1, rngs=nnx.Rngs(0))  # fmt: skip
    with pytest.raises(ValueError, match="3 channels, the model takes 1"):
        model("rope-2d")(jnp.zeros((1, 8, 8, 3)))


def test_learned_2d_is_its_table_at_its_grid_and_interpolated_elsewhere():
    m = model("learned-2d", grid=4)
    enc = m.encoding
    positions = jpe.pack_grid_positions(jpe.grid_positions(4, 4))[None]
    x = jnp.zeros((1, 16, 16))
    np.testing.assert_array_equal(enc.embed_grid(x, positions, (4, 4)), enc.embed(x, positions))
    np.testing.assert_array_equal(enc.embed(x, positions)[0], enc.table_[...].reshape(16, 16))
    bigger = jpe.pack_grid_positions(jpe.grid_positions(6, 6))[None]
    want = jpe.resize_table(enc.table_[...], (6, 6)).reshape(1, 36, 16)
    chex.assert_trees_all_close(enc.embed_grid(jnp.zeros((1, 36, 16)), bigger, (6, 6)), want)
    with pytest.raises(ValueError, match="holds a 4 x 4 grid"):
        enc.embed(jnp.zeros((1, 36, 16)), bigger)


def test_digits_split_is_fixed_and_stratified():
    data = vision.load_digits()
    assert len(data.train_images) + len(data.test_images) == 1797
    assert data.train_images.shape[1:] == (8, 8, 1) and data.classes[3] == "3"
    assert 0.0 <= data.train_images.min() and data.train_images.max() <= 1.0
    counts = np.bincount(data.test_labels) / len(data.test_labels)
    assert np.all(np.abs(counts - 0.1) < 0.02)
    np.testing.assert_array_equal(vision.load_digits().test_labels, data.test_labels)


def test_canvas_offsets_are_patch_aligned_and_resampling_keeps_the_image():
    rng = np.random.default_rng(0)
    offsets = vision.random_offsets(rng, 200, 8, 16, 2)
    assert set(np.unique(offsets)) == {0, 2, 4, 6, 8}
    images = rng.random((3, 8, 8, 1)).astype(np.float32)
    canvas = vision.place_on_canvas(images, 16, np.array([[0, 0], [2, 8], [8, 4]]))
    np.testing.assert_array_equal(canvas[1, 2:10, 8:16], images[1])
    assert canvas[1].sum() == pytest.approx(images[1].sum(), rel=1e-6)
    up = vision.resample(canvas, 32)
    assert up.shape == (3, 32, 32, 1)
    assert up.mean() == pytest.approx(canvas.mean(), rel=0.05)


def write_folder(root, sizes=((8, 8),) * 2, classes=("cat", "dog")):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i, size in enumerate(sizes):
            Image.fromarray(np.full(size[::-1], 40 * i, np.uint8)).save(root / c / f"{i}.png")


def test_image_folder_loads_and_its_errors_name_the_file(tmp_path):
    write_folder(tmp_path / "ok", sizes=((8, 8),) * 4)
    data = vision.load_image_folder(tmp_path / "ok", test_fraction=0.5)
    assert data.classes == ("cat", "dog") and data.train_images.shape == (4, 8, 8, 1)
    with pytest.raises(ValueError, match="'.*nowhere' is not a folder"):
        vision.load_image_folder(tmp_path / "nowhere")
    write_folder(tmp_path / "empty", sizes=())
    with pytest.raises(ValueError, match="class folder '.*cat' holds 0 image"):
        vision.load_image_folder(tmp_path / "empty")
    write_folder(tmp_path / "bad")
    (tmp_path / "bad" / "dog" / "2.png").write_text("not an image")
    with pytest.raises(ValueError, match="cannot read image '.*2.png'"):
        vision.load_image_folder(tmp_path / "bad")
    write_folder(tmp_path / "mixed", sizes=((8, 8), (6, 6)))
    with pytest.raises(ValueError, match="'.*1.png' is 6x6 pixels, but the first image is 8x8"):
        vision.load_image_folder(tmp_path / "mixed")
    with pytest.raises(ValueError, match="cannot split the 8 images of .*ok.* test_fraction 0.1"):
        vision.load_image_folder(tmp_path / "ok", test_fraction=0.1)
    write_folder(tmp_path / "odd", sizes=((10, 10),) * 4)
    with pytest.raises(ValueError, match="10x10 pixels, larger than the training canvas"):
        vision.load_data(VisionConfig(data=str(tmp_path / "odd"), train_size=8))


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"pe": "t5"}, "pe must be one of 'none', 'sinusoidal'"),
        ({"train_size": 13}, "train_size: 13 pixels do not divide into patches of 2"),
        ({"eval_sizes": (12, 15)}, "eval_sizes: 15 pixels"),
        ({"eval_sizes": (8,)}, r"eval_sizes must be >= train_size \(12\)"),
        ({"pe": "rope", "d_model": 24, "num_heads": 4}, "head_dim .* multiple of 4"),
        ({"pe_options": {"slope": 1}}, "unknown option"),
    ],
)
def test_config_errors_name_the_field(changes, match):
    with pytest.raises(ValueError, match=match):
        VisionConfig(**changes)


def test_cli_trains_writes_eval_json_and_resumes(tmp_path, capsys):
    args = [f"--workdir={tmp_path}", "--pe=rope-mixed", "--steps=4", "--eval-sizes=12,16",
            "--d-model=16", "--num-heads=2", "--num-layers=1", "--batch-size=8",
            "--checkpoint-every=2", "--eval-limit=64", "--no-progress"]  # fmt: skip
    assert vit_cli.main(args) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert list(report["accuracy"]) == ["12x12", "16x16"]  # training size first
    assert list(report["resampled"]) == ["12x12", "16x16"]
    assert report["accuracy"]["12x12"] == report["resampled"]["12x12"]  # the same images
    assert all(0.0 <= v <= 1.0 for v in report["accuracy"].values())
    assert report["encoding"] == "rope-mixed"
    assert "16x16" in capsys.readouterr().out
    assert vit_cli.main([*args, "--eval-sizes=12"]) == 0  # evaluation flags may change
    assert "resumed from step 4" in capsys.readouterr().out
    assert list(json.loads((tmp_path / "eval.json").read_text())["accuracy"]) == ["12x12"]
    assert vit_cli.main([*args, "--lr=0.1"]) == 2  # a different run: refused
    assert "lr: checkpoint 0.001, now 0.1" in capsys.readouterr().err


def test_cli_bad_input_exits_2_with_the_reason(tmp_path, capsys):
    assert vit_cli.main(["--pe=t5", f"--workdir={tmp_path}"]) == 2
    assert "pe must be one of" in capsys.readouterr().err
    assert vit_cli.main([f"--data={tmp_path / 'missing'}", f"--workdir={tmp_path}"]) == 2
    assert "missing' is not a folder" in capsys.readouterr().err
    assert vit_cli.main(["--train-size=11", f"--workdir={tmp_path}"]) == 2
    assert "train_size: 11 pixels" in capsys.readouterr().err


def test_lab_writes_results_table_and_plot(tmp_path):
    config = VisionConfig(steps=2, eval_sizes=(16,), **TINY)
    details = vision.run_vision_lab(config, ["alibi"], [0], tmp_path, progress=False)
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"alibi"} and list(results["alibi"]) == ["12", "16"]
    table = (tmp_path / "results.md").read_text()
    assert "| pe | 12x12 | 16x16 |" in table and "Resampled" in table
    assert (tmp_path / "vision.png").is_file()
    assert details["runs"]["alibi"]["0"]["resampled"]["12"] == results["alibi"]["12"]
