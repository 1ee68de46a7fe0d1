"""The length-extrapolation lab end to end at a tiny size, its outputs, and its memory claim."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jpe
from jpe.lab import extrapolate as lab_lib
from jpe.nn import encoding_class
from train import extrapolate as cli

TINY = ["--steps=3", "--seq-len=16", "--eval-lengths=16,32,64", "--eval-tokens=128",
        "--d-model=32", "--num-layers=1", "--num-heads=2", "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def lab_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lab")
    argv = [*TINY, "--pe=alibi,rope,sinusoidal+randomized", "--rope-scaling=linear,yarn",
            "--seeds=0,1", f"--workdir={workdir}"]  # fmt: skip
    assert cli.main(argv) == 0
    return workdir


def test_results_json_has_every_line_and_length(lab_run):
    results = json.loads((lab_run / "results.json").read_text())
    expected = {"alibi", "rope", "rope+linear", "rope+yarn", "sinusoidal+randomized"}
    assert set(results) == expected
    for spec, by_length in results.items():
        assert set(by_length) == {"16", "32", "64"}, spec
        assert all(1.0 < v < 1e4 for v in by_length.values()), (spec, by_length)
    # At factor 1 (the training length) a scaling changes nothing.
    assert results["rope+linear"]["16"] == pytest.approx(results["rope"]["16"], rel=1e-6)
    assert results["rope+linear"]["64"] != pytest.approx(results["rope"]["64"], rel=1e-6)


def test_details_keep_seeds_modes_and_positions(lab_run):
    details = json.loads((lab_run / "details.json").read_text())
    alibi = details["runs"]["alibi"]
    assert set(alibi) == {"0", "1"}
    assert alibi["0"]["ppl"] != alibi["1"]["ppl"], "two seeds should give two runs"
    assert set(alibi["0"]["ppl_sliding"]) == {"16", "32", "64"}
    assert len(alibi["0"]["loss_by_position"]) == 64
    results = json.loads((lab_run / "results.json").read_text())
    mean = np.mean([alibi[s]["ppl"]["32"] for s in ("0", "1")])
    assert results["alibi"]["32"] == pytest.approx(mean)
    assert details["config"]["seq_len"] == 16 and "cpu" in details["machine"]


def test_markdown_and_figures(lab_run):
    md = (lab_run / "results.md").read_text()
    assert "| alibi |" in md and "| rope+yarn |" in md and "64 (4x)" in md
    assert "sliding windows" in md and "non-overlapping" in md
    for name in ("extrapolation.png", "position_loss.png"):
        data = (lab_run / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name


def test_compile_and_run_seconds_per_run(lab_run):
    """Each run records its evaluation's compile and run seconds apart; the second seed of
    one configuration reuses the first seed's executables, compiling nothing."""
    details = json.loads((lab_run / "details.json").read_text())
    for spec in ("alibi", "rope", "rope+linear"):
        first, second = (details["runs"][spec][s]["seconds"] for s in ("0", "1"))
        assert first["wall"] > 0 and first["eval_run"] > 0 and second["eval_run"] > 0, spec
        assert second["eval_compiles"] == 0 and second["eval_compile"] == 0, spec
    assert details["runs"]["alibi"]["0"]["seconds"]["eval_compiles"] <= 3  # one per length
    md = (lab_run / "results.md").read_text()
    assert f"### {lab_lib.report.SECONDS_TITLE}" in md and "| eval_compile |" in md
    assert "| train_compile |" in md and "compiling the train steps took" in md


def test_mean_and_spread_with_two_seeds(lab_run):
    """With several seeds, each cell is the mean ± half the min–max range, as captioned."""
    details = json.loads((lab_run / "details.json").read_text())
    md = (lab_run / "results.md").read_text()
    assert "Cells: mean over the 2 seeds ± half their min–max range." in md
    values = [details["runs"]["alibi"][s]["ppl"]["32"] for s in ("0", "1")]
    cell = f"{np.mean(values):.2f} ± {(max(values) - min(values)) / 2:.2f}"
    row = next(ln for ln in md.splitlines() if ln.startswith("| alibi |"))
    assert row.split("|")[3].strip() == cell


def test_1x_curve_is_recorded_at_the_expected_steps(lab_run):
    """Each trained run keeps its 1x validation perplexity at every 10% of the steps and at
    80% and 100% (here, 3 steps: 1, 2 and 3); the rope scalings, not trained, have none."""
    assert lab_lib.curve_steps(300) == tuple(range(30, 301, 30))
    assert lab_lib.curve_steps(3) == (1, 2, 3)
    assert lab_lib.report.plateau_start(300) == 240 and 240 in lab_lib.curve_steps(300)
    assert lab_lib.report.plateau_start(25) in lab_lib.curve_steps(25)
    details = json.loads((lab_run / "details.json").read_text())
    for spec in ("alibi", "rope", "sinusoidal+randomized"):
        for seed in ("0", "1"):
            curve = details["runs"][spec][seed]["ppl_1x_curve"]
            assert [step for step, _ in curve] == [1, 2, 3], (spec, seed)
            assert all(1.0 < ppl < 1e4 for _, ppl in curve), (spec, seed)
            seconds = details["runs"][spec][seed]["seconds"]
            assert seconds["train"] > 0 and seconds["val_1x"] > 0
            # the train step compiled (no persistent cache in tests), within the run's time
            assert 0 < seconds["train_compile"] < seconds["wall"], (spec, seed, seconds)
    assert "ppl_1x_curve" not in details["runs"]["rope+linear"]["0"]
    # a second seed of one configuration runs its own weights through the same forward
    alibi = details["runs"]["alibi"]
    assert alibi["0"]["ppl_1x_curve"] != alibi["1"]["ppl_1x_curve"]
    metrics = (lab_run / "runs" / "alibi-seed0" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in metrics if "val_ppl" in ln] == [1, 2, 3]


def test_results_md_has_the_plateau_table(lab_run):
    md = (lab_run / "results.md").read_text()
    title = f"### {lab_lib.report.PLATEAU_TITLE}"
    assert title in md
    section = md[md.index(title) :].split("\n### ")[0]
    assert "| pe | seed 0 | seed 1 | worst | check |" in section
    for spec in ("alibi", "rope", "sinusoidal+randomized"):
        assert f"| {spec} |" in section
    assert "| rope+linear |" not in section, "the scalings are not trained"
    assert "runs pass" in section or "runs fail" in section
    assert lab_lib.report.PLATEAU_TITLE not in lab_lib.report.read_tables(md)


def _synthetic(curves: dict) -> dict:
    runs = {
        spec: {seed: {"ppl_1x_curve": c} for seed, c in by.items()} for spec, by in curves.items()
    }
    runs["rope+linear"] = {"0": {"ppl": {"64": 5.0}}}
    return {"config": {"seeds": [0, 1]}, "runs": runs}


def test_plateau_check_from_a_synthetic_details_dict():
    check = lab_lib.report.Plateau("ppl_1x_curve", "1x validation perplexity")
    details = _synthetic(
        {
            "flat": {"0": [[30, 9.0], [240, 5.0], [300, 4.95]], "1": [[240, 4.0], [300, 4.0]]},
            # no point at 240 exactly: the last one before it (200) stands in
            "steep": {"0": [[200, 5.0], [250, 4.5], [300, 4.8]], "1": [[240, 5.0], [300, 4.8]]},
        }
    )
    gains = lab_lib.report.plateau(details, check)
    assert set(gains) == {"flat", "steep"}, "runs without a curve are left out"
    assert gains["flat"]["0"] == pytest.approx(0.01) and gains["flat"]["1"] == 0.0
    assert gains["steep"]["0"] == pytest.approx(0.04) and gains["steep"]["1"] == pytest.approx(0.04)
    lines = lab_lib.report.plateau_markdown(details, check)
    text = "\n".join(lines)
    assert "| flat | +1.00% | +0.00% | +1.00% | pass |" in text
    assert "| steep | +4.00% | +4.00% | +4.00% | FAIL |" in text
    assert "2 of 4 runs fail" in text and "steep (seed 0: +4.00%)" in text
    passing = _synthetic({"flat": {"0": [[240, 5.0], [300, 4.95]]}})
    assert "All 1 runs pass" in "\n".join(lab_lib.report.plateau_markdown(passing, check))
    assert lab_lib.report.plateau_markdown({"runs": {"a": {"0": {}}}}, check) == []


def test_add_to_puts_new_encodings_beside_an_earlier_lab(lab_run, tmp_path):
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    for name in ("results.md", "results.json"):
        (earlier / name).write_text((lab_run / name).read_text())
    before = (earlier / "results.md").read_text()
    argv = [*TINY, "--pe=none", "--rope-scaling=", "--seeds=0", f"--workdir={tmp_path / 'w'}",
            f"--add-to={earlier}"]  # fmt: skip
    assert cli.main(argv) == 0
    text = (earlier / "results.md").read_text()
    tables = lab_lib.report.read_tables(text)
    assert len(tables) == 3  # two modes, and the seconds per encoding
    assert lab_lib.report.SECONDS_TITLE in tables
    for rows in tables.values():
        assert {"alibi", "rope", "none"} <= set(rows)
    old = lab_lib.report.read_tables(before)
    for title, rows in old.items():
        assert all(tables[title][name] == row for name, row in rows.items()), "earlier rows kept"
    new = json.loads((tmp_path / "w" / "results.json").read_text())["none"]
    merged = json.loads((earlier / "results.json").read_text())
    assert merged["none"] == new and "alibi" in merged
    assert "Rows added later (none)" in text
    assert (earlier / "extrapolation.png").read_bytes()[:4] == b"\x89PNG"
    # the tables read back as the numbers they print (two decimals)
    for length, value in merged["alibi"].items():
        assert tables[next(iter(tables))]["alibi"][length] == pytest.approx(value, abs=0.006)
    bad = [*TINY, "--pe=none", "--eval-lengths=16,32", f"--workdir={tmp_path / 'x'}",
           f"--add-to={earlier}"]  # fmt: skip
    assert cli.main(bad) == 2
    assert not (tmp_path / "x" / "runs").exists(), "checked before training"


def test_running_again_resumes_instead_of_retraining(lab_run, tmp_path):
    workdir = tmp_path / "lab"  # a copy: the module's lab stays as it was for the other tests
    shutil.copytree(lab_run, workdir)
    before = (workdir / "runs" / "alibi-seed0" / "metrics.jsonl").read_text()
    argv = [*TINY, "--pe=alibi", "--rope-scaling=", "--seeds=0", f"--workdir={workdir}"]
    assert cli.main(argv) == 0
    assert (workdir / "runs" / "alibi-seed0" / "metrics.jsonl").read_text() == before


@pytest.mark.skipif(len(lab_lib._cpu_sets(1)[0]) < 2, reason="needs two CPUs")
def test_jobs_run_side_by_side_and_give_the_same_numbers(lab_run, tmp_path, capsys):
    """`--jobs=2`: two worker processes, each on its own CPU, give every run the perplexities
    of the one-process lab of the module (the same flags) up to float rounding, and the
    details keep the order of --pe and --seeds whichever run finished first."""
    # rope, listed first, most likely finishes last: it also evaluates its scaling.
    argv = [*TINY, "--pe=rope,alibi", "--rope-scaling=linear", "--seeds=0", "--jobs=2",
            f"--workdir={tmp_path}"]  # fmt: skip
    assert cli.main(argv) == 0
    assert "2 runs in 2 worker processes" in capsys.readouterr().out
    ours = json.loads((tmp_path / "details.json").read_text())["runs"]
    alone = json.loads((lab_run / "details.json").read_text())["runs"]
    assert list(ours) == ["rope", "rope+linear", "alibi"]
    for spec, by_seed in ours.items():
        assert set(by_seed) == {"0"}
        for mode in ("ppl", "ppl_sliding"):
            assert set(by_seed["0"][mode]) == {"16", "32", "64"}
            for length, ppl in by_seed["0"][mode].items():
                assert ppl == pytest.approx(alone[spec]["0"][mode][length], rel=1e-4), (
                    spec, mode, length
                )  # fmt: skip


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--pe=alibi,nope"], "unknown encoding 'nope'"),
        (["--pe=rope", "--rope-scaling=su"], "rope_scalings"),
        (["--pe=rope", "--eval-lengths=4,16", "--stride=8"], "stride"),
        (["--pe=alibi", "--jobs=0"], "jobs must be an integer >= 1"),
        (["--pe=alibi", "--seeds=0,0"], "each seed once"),
        (["--pe=alibi", "--jobs=100000"], "CPUs this process may use"),
        (["--task=copy", "--jobs=2"], "--jobs applies to the language-model lab"),
    ],
)
def test_bad_arguments(argv, message, tmp_path, capsys):
    assert cli.main([*TINY, f"--workdir={tmp_path}", *argv]) == 2
    assert message in capsys.readouterr().err


def test_scaled_rope_config():
    config = jpe.TransformerConfig(pe="rope", pe_options={"base": 500.0})
    scaled = lambda *args: lab_lib.scaled_rope_config(config, *args).pe_options  # noqa: E731
    yarn = scaled("yarn", 512, 64)
    assert yarn.scaling_mapping == {
        "rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64
    }  # fmt: skip
    assert yarn.base == 500.0, "the other options are kept"
    assert scaled("dynamic", 512, 64).scaling_mapping["factor"] == 1.0
    assert scaled("linear", 32, 64).scaling_mapping["factor"] == 1.0


def test_flags_take_their_defaults_from_the_lab_config():
    default = lab_lib.LabConfig().pes  # every 1-D encoding; 2-D ones are the vision lab's
    assert "floater" in default and "alibi" in default and "rope-2d" not in default
    assert lab_lib.LabConfig().seeds == (0, 1, 2), "the README's run: mean and spread"
    lab = cli.build_lab(cli.parser().parse_args(["--pe=alibi"]))
    assert lab == lab_lib.LabConfig(pes=("alibi",))
    assert lab.warmup == lab.steps // 10
    # --train-len is the old name of --seq-len
    old = cli.build_lab(cli.parser().parse_args(["--pe=alibi", "--train-len=32"]))
    assert old.seq_len == 32 and old == lab_lib.LabConfig(pes=("alibi",), seq_len=32)
    task = cli.build_lab(cli.parser().parse_args(["--task=sort", "--eval-lengths=4,8"]))
    assert task == lab_lib.TaskLabConfig(task="sort", test_lengths=(4, 8))


# --- memory: nothing quadratic at 32x the training length --------------------------------------


def _quadratic_intermediates(jaxpr, length: int) -> list[tuple]:
    """Shapes of arrays, made by any equation of `jaxpr` or its sub-jaxprs, that are
    quadratic in `length`: two dimensions of at least `length`, or one of at least length^2/8."""
    found = []

    def visit(j):
        for eqn in j.eqns:
            for var in eqn.outvars:
                shape = tuple(getattr(var.aval, "shape", ()))
                if sum(d >= length for d in shape) >= 2 or any(
                    d >= length * length // 8 for d in shape
                ):
                    found.append(shape)
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else (param,):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        visit(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        visit(sub)

    visit(jaxpr.jaxpr)
    return found


@pytest.mark.parametrize(
    "pe",
    [
        pe
        for pe in jpe.ENCODINGS
        if any(encoding_class(pe).capabilities()[2:]) or pe in ("rope", "none")
    ],
)
def test_evaluation_at_32x_builds_nothing_quadratic(pe):
    length, block = 32 * 64, 256
    config = jpe.TransformerConfig(
        pe=pe, d_model=32, num_heads=2, num_layers=1, max_len=length, block_size=block
    )
    model = jpe.Transformer(config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    forward = lambda state, tokens: nnx.merge(graphdef, state)(tokens)  # noqa: E731
    jaxpr = jax.make_jaxpr(forward)(state, jnp.zeros((1, length), jnp.int32))
    quadratic = _quadratic_intermediates(jaxpr, length)
    if encoding_class(pe).capabilities().contextual_bias:  # CoPE: documented as dense
        assert quadratic, pe
    else:
        assert not quadratic, f"{pe} builds {quadratic[:3]} at L={length}"


def test_task_mode_end_to_end(tmp_path):
    argv = ["--task=copy", "--pe=rope,none+randomized", "--task-len=3", "--steps=3",
            "--batch-size=4", "--d-model=16", "--num-layers=1", "--num-heads=2",
            "--eval-lengths=3,6", "--seeds=0,1", "--no-progress",
            f"--workdir={tmp_path}"]  # fmt: skip
    assert cli.main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"rope", "none+randomized"}
    for by_length in results.values():
        assert set(by_length) == {"3", "6"}
        assert all(0.0 <= v <= 1.0 for v in by_length.values())
    details = json.loads((tmp_path / "details.json").read_text())
    assert set(details["runs"]["rope"]) == {"0", "1"}
    assert "Exact-match accuracy" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_task_mode_rejects_unknown_task(tmp_path, capsys):
    assert cli.main(["--task=addition", "--pe=rope", f"--workdir={tmp_path}"]) == 2
    assert "task" in capsys.readouterr().err
