"""train/lm.py and jpe.lab.train: runs, resumption, sharding and the command line's errors.

Every run here is a few steps of a tiny model; losses are compared, never timed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from jpe import TransformerConfig
from jpe.lab import cli, sharding
from jpe.lab.train import NonFiniteLossError, TrainConfig, flatten_model, train
from train import lm

ROOT = Path(__file__).resolve().parents[1]

SMALL = dict(d_model=32, num_layers=2, num_heads=2)


def _cfg(pe="rope", **kw):
    model = {**SMALL, "pe": pe, **kw.pop("model", {})}
    base = dict(steps=6, batch_size=8, seq_len=32, lr=1e-3, warmup=2, checkpoint_every=3,
                log_every=1, eval_tokens=128, eval_lengths=(32, 64))  # fmt: skip
    return TrainConfig(model=TransformerConfig(**model), **{**base, **kw})


def _losses(workdir: Path) -> list[float]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def _subprocess(code: str, env_extra: dict | None = None, timeout: int = 600):
    """Runs `code` in a fresh interpreter with the run's XLA flags (conftest.py's compile
    flags, so that its programs match this process's) but no device count of their own; a
    device count or other flags in `env_extra["XLA_FLAGS"]` are added to them."""
    flags = [
        f
        for f in os.environ.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    extra = dict(env_extra or {})
    env = {**os.environ, **extra}
    env["XLA_FLAGS"] = " ".join([*flags, extra.get("XLA_FLAGS", "")]).strip()
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT,
    )  # fmt: skip


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted 6-step rope run: the losses everything else is compared with."""
    workdir = tmp_path_factory.mktemp("reference")
    result = train(_cfg(), workdir, progress=False)
    return workdir, result


def test_run_writes_metrics_eval_and_checkpoints(reference_run):
    workdir, result = reference_run
    losses = _losses(workdir)
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert losses[-1] < losses[0], "six AdamW steps should lower the training loss"
    report = json.loads((workdir / "eval.json").read_text())
    assert report["pe"] == "rope" and report["train_len"] == 32
    assert set(report["ppl"]) == {"32", "64"}
    assert all(1.0 < v < 1000 for v in report["ppl"].values())
    assert len(report["loss_by_position"]["64"]) == 64
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [3, 6]
    assert result["start_step"] == 0


def test_running_again_resumes_and_does_not_retrain(reference_run):
    workdir, first = reference_run
    before = (workdir / "metrics.jsonl").read_text()
    again = train(_cfg(), workdir, progress=False)
    assert again["start_step"] == 6 and again["losses"] == []
    assert (workdir / "metrics.jsonl").read_text() == before
    assert again["eval"]["ppl"] == pytest.approx(first["eval"]["ppl"], rel=1e-6)


def test_sigkill_during_an_async_save_then_resume_gives_the_same_losses(reference_run, tmp_path):
    """The process SIGKILLs itself right after starting the asynchronous save of step 3 (so
    the save is likely unfinished); the restart must reproduce the uninterrupted run's losses
    step for step, and its metrics file must read as one run."""
    ref_dir, _ = reference_run
    code = f"""
        import os, signal
        import jpe.lab.core as core
        import jpe.lab.train as T
        from tests.test_train import _cfg
        original = core.Checkpoints.save
        def save_then_die(self, step, *args):
            original(self, step, *args)
            if step == 3:
                os.kill(os.getpid(), signal.SIGKILL)   # async save of step 3 may be in flight
        core.Checkpoints.save = save_then_die
        T.train(_cfg(), {str(tmp_path)!r}, progress=False)
    """
    proc = _subprocess(code)
    assert proc.returncode == -9, proc.stderr[-3000:]
    result = train(_cfg(), tmp_path, progress=False)
    assert result["start_step"] in (0, 3)
    np.testing.assert_allclose(_losses(tmp_path), _losses(ref_dir), rtol=1e-6)


def test_resume_with_another_model_config_is_refused(reference_run):
    workdir, _ = reference_run
    other = _cfg(model={"d_model": 64}, lr=2e-3)
    with pytest.raises(ValueError, match=r"model\.d_model: checkpoint 32, now 64") as info:
        train(other, workdir, progress=False)
    assert "lr: checkpoint 0.001, now 0.002" in str(info.value)


def test_sharded_losses_match_one_device(reference_run):
    """8 simulated CPU devices, meshes 8x1 and 4x2, against this process's single device."""
    ref_dir, _ = reference_run
    code = """
        import json, sys, tempfile
        import jax
        from tests.test_train import _cfg
        from jpe.lab.train import train
        assert jax.device_count() == 8, jax.devices()
        out = {}
        for mesh in ("8x1", "4x2"):
            with tempfile.TemporaryDirectory() as d:
                losses = [r["loss"] for r in train(_cfg(mesh=mesh), d, progress=False)["losses"]]
            out[mesh] = losses
        print("LOSSES" + json.dumps(out))
    """
    proc = _subprocess(code, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("LOSSES"))
    sharded = json.loads(line[len("LOSSES") :])
    for mesh, losses in sharded.items():
        np.testing.assert_allclose(losses, _losses(ref_dir), rtol=1e-3, err_msg=mesh)


def test_parameters_split_heads_and_mlp_over_model_axis():
    from flax import nnx

    from jpe import Transformer

    model = Transformer(TransformerConfig(**SMALL, pe="alibi"), rngs=nnx.Rngs(0))
    _, params = flatten_model(model)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    specs = {k: s.spec for k, s in sharding.param_shardings(params, mesh).items()}
    assert specs["blocks/0/attn/q/kernel"] == jax.sharding.PartitionSpec(None, "model")
    assert specs["blocks/0/attn/o/kernel"] == jax.sharding.PartitionSpec("model", None)
    assert specs["blocks/0/up/kernel"] == jax.sharding.PartitionSpec(None, "model")
    assert specs["blocks/0/down/kernel"] == jax.sharding.PartitionSpec("model", None)
    embed = next(k for k in specs if "embed" in k)
    assert specs[embed] == jax.sharding.PartitionSpec(None, None)


@pytest.mark.parametrize(
    "spec, devices, expected",
    [(None, 8, (8, 1)), ("4x2", 8, (4, 2)), ("8X1", 8, (8, 1)), ("1x1", 1, (1, 1))],
)
def test_parse_mesh(spec, devices, expected):
    assert sharding.parse_mesh(spec, devices) == expected


@pytest.mark.parametrize("spec", ["3x3", "4", "ax2", "0x8", "2x2x2"])
def test_parse_mesh_rejects(spec):
    with pytest.raises(ValueError, match="mesh"):
        sharding.parse_mesh(spec, 8)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = _cfg(steps=6, lr=1e6, warmup=0, clip=1e9, checkpoint_every=1)
    with pytest.raises(NonFiniteLossError, match="last good checkpoint") as info:
        train(cfg, tmp_path, progress=False)
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps, "at least one finite step should have been checkpointed"
    assert f"step {steps[-1]}" in str(info.value)


# --- presets and the command line ------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["--config=smoke", "--pe=alibi"],
        ["--config=smoke", "--pe=learned", "--pack"],
        ["--config=smoke", "--pe=t5", "--random-positions=256", "--eval-stride=16"],
        ["--config=tiny", "--pe=rope", "--steps=2", "--checkpoint-every=2", "--eval-tokens=128"],
        ["--config=gpu_small", "--pe=rope", "--steps=1", "--batch-size=2", "--seq-len=16",
         "--num-layers=2", "--eval-tokens=32", "--eval-lengths=16"],
    ],
    ids=["smoke-alibi", "smoke-learned-packed", "smoke-t5-randomized", "tiny", "gpu_small"],
)  # fmt: skip
def test_presets_run_a_few_steps(argv, tmp_path, capsys):
    rc = lm.main([*argv, f"--workdir={tmp_path}", "--no-progress"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "validation perplexity" in out.out
    report = json.loads((tmp_path / "eval.json").read_text())
    assert all(np.isfinite(v) for v in report["ppl"].values())


def test_every_preset_has_a_docstring_with_its_command():
    for path in sorted((ROOT / "configs").glob("*.py")):
        preset = cli.load_preset(lm.CONFIGS, path.stem)
        doc = (path.read_text().split('"""') + ["", ""])[1]
        assert "train/lm.py" in doc and "Hardware" in doc, path
        assert isinstance(preset, TrainConfig), path


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--pe=rotary"], "unknown positional encoding pe='rotary'; valid names: none"),
        (["--mesh=3x3"], "mesh"),
        (["--mesh=banana"], "mesh"),
        (["--data=/nonexistent/corpus.txt"], "/nonexistent/corpus.txt"),
        (["--config=nope"], "unknown --config 'nope'"),
        (["--eval-lengths=0,64"], "eval_lengths"),
        (['--pe-options={"num_buckets": 8}'], "unknown option(s) 'num_buckets' for pe='rope'"),
        (["--pe=t5", "--pe-options=[1]"], "expected a JSON object"),
    ],
)
def test_bad_flags_give_clear_errors(argv, message, tmp_path, capsys):
    try:
        rc = lm.main(["--config=smoke", f"--workdir={tmp_path}", "--no-progress", *argv])
    except SystemExit as e:  # argparse
        rc = e.code
    assert rc == 2
    assert message in capsys.readouterr().err


def test_everything_a_run_needs_is_checked_before_training(tmp_path, capsys):
    """An evaluation length longer than the validation split used to fail after training."""
    argv = ["--config=smoke", "--pe=learned", "--eval-lengths=32,999999", "--no-progress"]
    rc = lm.main([*argv, f"--workdir={tmp_path}"])
    assert rc == 2
    assert "eval_lengths" in capsys.readouterr().err
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_flags_default_to_the_preset_and_override_it():
    cfg = lm.build_config(lm.parser().parse_args(["--config=smoke"]))
    smoke = cli.load_preset(lm.CONFIGS, "smoke")
    assert (cfg.steps, cfg.seq_len, cfg.model.d_model) == (smoke.steps, smoke.seq_len, 32)
    assert cfg.eval_lengths == (32, 64, 128) and cfg.eval_stride == 8
    args = ["--config=smoke", "--pe=t5", '--pe-options={"num_buckets": 8}', "--steps=9"]
    cfg = lm.build_config(lm.parser().parse_args(args))
    assert cfg.steps == 9 and cfg.model.pe_options.num_buckets == 8
    # a learned table covers every position the run uses unless --max-len says otherwise
    cfg = lm.build_config(lm.parser().parse_args(["--config=smoke", "--pe=learned"]))
    assert cfg.model.max_len == 128


@pytest.mark.parametrize("content, message", [(b"", "empty"), (b"\xff\xfe\x00abc", "UTF-8")])
def test_bad_data_files_are_named(content, message, tmp_path, capsys):
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    rc = lm.main(["--config=smoke", f"--data={path}", f"--workdir={tmp_path / 'w'}"])
    err = capsys.readouterr().err
    assert rc == 2 and str(path) in err and message in err


def test_stop_at_then_resume_gives_the_same_losses(reference_run, tmp_path):
    ref_dir, _ = reference_run
    first = train(_cfg(), tmp_path, progress=False, stop_at=4)
    assert [r["step"] for r in first["losses"]] == [1, 2, 3, 4]
    second = train(_cfg(), tmp_path, progress=False)
    assert second["start_step"] == 4
    np.testing.assert_allclose(_losses(tmp_path), _losses(ref_dir), rtol=1e-6)


def test_command_lines_restart_with_glibc_malloc_tuned_once():
    """train/_runtime.py: the tunable is added to what GLIBC_TUNABLES holds, once, and can be
    switched off."""
    import platform
    import sys

    from train import _runtime

    env = _runtime.tuned_environment({"PATH": "/bin"})
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        assert env is None
        return
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1" and env["PATH"] == "/bin"
    both = _runtime.tuned_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert both["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert _runtime.tuned_environment(env) is None  # already restarted: no loop
    assert _runtime.tuned_environment({"JPE_MALLOC_TUNING": "0"}) is None


def test_field_help_reads_each_attribute_and_only_attributes():
    """A continuation line holding a colon ("... for the plateau check: a run passes ...") is
    part of the attribute above it, not an attribute of its own."""
    from jpe.lab.extrapolate import LabConfig

    helps = cli._field_help(LabConfig)
    assert "plateau check: a run passes" in helps["val_windows"]
    assert helps["steps"] == helps["lr"] and "training budget" in helps["steps"]
    assert not any(" " in name for name in helps), sorted(helps)
