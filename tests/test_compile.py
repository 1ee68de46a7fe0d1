"""`train/compile.py`: the sharded train step compiled ahead of time for a TPU topology (with
libtpu, no TPU), and lowered for CUDA, on this CPU machine; with the fused kernel in it."""

import importlib.util
import logging
import re

import jax

from train import compile as compile_cli
from train import lm

# Not skipped: the test extra installs libtpu, so CI runs these.
assert importlib.util.find_spec("libtpu"), "libtpu is missing: pip install -e '.[test]'"

L = 2048
SMALL = [
    "--pe=alibi",
    f"--seq-len={L}",
    "--d-model=64",
    "--num-layers=1",
    "--num-heads=2",
    "--batch-size=4",
    "--block-size=256",
]


def test_tpu_step_compiles_with_the_kernel_and_no_quadratic_buffer(caplog):
    """The step of `train/lm.py` compiles for v5e:2x2 with the three Pallas (Mosaic) kernels in
    it, and no array of the compiled program holds L * L / 4 elements or more (the largest
    are the `[L, vocab]` logits of a row). The executable stays out of the run's persistent
    compilation cache (tests/conftest.py), which could not load it back without a TPU client."""
    cfg = lm.build_config(lm.parser(None).parse_args(SMALL))
    cache_seconds = jax.config.jax_persistent_cache_min_compile_time_secs
    with caplog.at_level(logging.DEBUG, logger="jax._src.compiler"):
        compiled, mesh = compile_cli.compile_step(cfg, "v5e:2x2")
    assert "Not writing persistent cache entry for 'jit_step_fn'" in caplog.text
    assert jax.config.jax_persistent_cache_min_compile_time_secs == cache_seconds
    assert dict(mesh.shape) == {"data": 4, "model": 1}
    text = compiled.as_text()
    for name in ("jpe_flash_fwd", "jpe_flash_dq", "jpe_flash_dkv"):
        assert name in text, name
    sizes = []
    for dims in re.findall(r"(?:f32|bf16|s32|pred)\[([0-9,]+)\]", text):
        n = 1
        for d in dims.split(","):
            n *= int(d)
        sizes.append(n)
    assert sizes and max(sizes) < L * L // 4, max(sizes)
    assert compiled.memory_analysis().temp_size_in_bytes > 0


def test_main_prints_memory_and_fails_when_hbm_is_too_small(capsys, monkeypatch):
    compiled = []

    def compile_once(cfg, topology):
        if not compiled:
            compiled.append(compile_step(cfg, topology))
        return compiled[0]

    compile_step = compile_cli.compile_step
    monkeypatch.setattr(compile_cli, "compile_step", compile_once)
    assert compile_cli.main(SMALL) == 0
    out = capsys.readouterr().out
    assert "attention=pallas" in out and "memory per device" in out
    assert re.search(r"temp: \d+\.\d{3} GiB", out) and "fits:" in out
    # The same compiled step against a chip of 1 MiB: exit status 4.
    monkeypatch.setitem(compile_cli.HBM_GIB, "v5e", 2**-10)
    assert compile_cli.main(SMALL) == 4
    assert "more than a v5e chip's" in capsys.readouterr().err


def test_gpu_lowering_has_one_triton_kernel_per_pass_and_layer(capsys):
    assert compile_cli.main(["--platform=gpu", *SMALL, "--num-layers=2"]) == 0
    out = capsys.readouterr().out
    assert "6 Triton kernel calls" in out, out  # forward, dq, dk/dv in each of 2 layers


def test_gpu_lowering_of_cudnn_says_it_needs_a_gpu(capsys):
    argv = ["--platform=gpu", "--pe=none", "--bf16", "--seq-len=256", "--num-layers=1"]
    assert compile_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "attention=cudnn cannot be lowered without a GPU" in err
    assert "--attention=pallas" in err
