"""`train/bench.py kernels`: the table's rows, its FLOP count and its refusals (tiny shapes;
the figures themselves are measured by the command, never by tests)."""

import tempfile

import pytest

from train import bench


def test_flop_count_is_flashattention2s():
    # two [L, D] x [D, L]-sized products, 2 FLOPs a multiply-add, half of them under a causal
    # mask; the backward pass counts 2.5 forwards (Dao 2023, section 4.1)
    assert bench._attention_flops(1, 1, 4, 2, backward=False) == 2 * 2 * 4 * 4 * 2 / 2
    assert bench._attention_flops(3, 5, 8, 4, backward=True) == 3.5 * 4 * 3 * 5 * 64 * 4 / 2


def test_kernels_table_has_a_row_per_encoding_implementation_and_pass(capsys):
    bench.main(
        ["kernels", "--pe", "alibi,none,t5", "--lengths", "32", "--head-dims", "8",
         "--d-model", "16", "--tokens", "64", "--repeats", "1", "--implementations",
         "xla,pallas", "--passes", "fwd,fwdbwd"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "pallas in interpret mode" in out
    rows = [line.split() for line in out.splitlines()[2:]]
    seen = {(r[0], r[1], r[2]) for r in rows}
    assert seen == {
        (pe, impl, p)
        for pe in ("none", "alibi", "t5")
        for impl in ("pallas", "xla")
        for p in ("fwd", "fwdbwd")
    }
    for r in rows:
        assert r[3:7] == ["8", "32", "2", "2"], r  # D, L, B = 64 // 32, H = 16 // 8
        assert float(r[7]) > 0 and float(r[8]) > 0, r  # ms, TFLOP/s
        assert r[11] == ("1.00x" if r[0] == "none" else r[11]) and r[11].endswith("x"), r
    # none comes first within each (implementation, pass), so every row has its "vs none"
    assert [r[0] for r in rows[:3]] == ["none", "alibi", "t5"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--implementations", "cudnn"], "cuDNN needs a GPU"),
        (["--implementations", "triton"], "choose from"),
        (["--pe", "shaw"], "choose from none, rope, alibi, t5, kerple, fire"),
        (["--passes", "bwd"], "choose from fwd, fwdbwd"),
        (["--lengths", "0"], "--lengths must be positive"),
    ],
)
def test_kernels_refuses_what_it_cannot_measure(argv, message):
    with pytest.raises(SystemExit, match=message):
        bench.main(["kernels", *argv])


def test_hlo_instructions_name_shape_opcode_and_jax_op():
    import jax
    import jax.numpy as jnp

    def f(a, b):
        return jnp.tanh(a @ b).sum(), (a * 2.0, b)

    hlo = jax.jit(f).lower(jnp.ones((4, 3)), jnp.ones((3, 5))).compile().as_text()
    ops = bench.hlo_instructions(hlo)
    assert ops, hlo
    # every instruction of the entry computation is found, tuple-shaped ones included
    roots = [line for line in hlo.splitlines() if line.lstrip().startswith("ROOT")]
    assert all(line.split("=")[0].split()[-1].lstrip("%") in ops for line in roots)
    assert any(shape.startswith("(") for shape, _, _ in ops.values())
    assert any(op.endswith("dot_general") for _, _, op in ops.values())
    assert bench.jax_op("jit(f)/tanh") == "tanh"
    assert bench.jax_op("jit(f)/transpose(jvp())/dot_general") == "dot_general (backward)"
    assert bench.jax_op("") == "(no jax op)"


def test_profile_prints_the_steps_ops_by_time(capsys, tmp_path):
    bench.main(
        ["profile", "--pe", "alibi", "--steps", "1", "--top", "3", "--d-model", "16",
         "--num-layers", "1", "--num-heads", "2", "--seq-len", "8", "--batch-size", "2",
         "--trace-dir", str(tmp_path)]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "train step profile, pe alibi" in out
    gflop = float(out.split("XLA's cost analysis: ")[1].split()[0])
    assert 0 < gflop < 1  # a 1-layer, d_model 16 model on 2 x 8 tokens
    assert list(tmp_path.rglob("*.xplane.pb"))
    lines = out.splitlines()
    by_op = lines[lines.index("by jax op (top 3)") + 2 :][:3]
    shares = [float(line.split()[1].rstrip("%")) for line in by_op]
    assert len(shares) == 3 and shares == sorted(shares, reverse=True) and sum(shares) <= 100.05
    by_instruction = lines[lines.index("by HLO instruction (top 3)") + 2 :]
    assert len(by_instruction) == 3
    assert all(float(line.split()[0]) > 0 for line in by_instruction)


def test_profile_without_a_trace_dir_leaves_no_trace(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    bench.main(
        ["profile", "--pe", "none", "--steps", "1", "--top", "1", "--d-model", "16",
         "--num-layers", "1", "--num-heads", "2", "--seq-len", "8", "--batch-size", "2"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "train step profile, pe none" in out and "trace in" not in out
    assert not list(tmp_path.glob("jpe-profile-*"))


def test_profile_refuses_an_unknown_encoding():
    with pytest.raises(SystemExit, match="unknown --pe 'nope'"):
        bench.main(["profile", "--pe", "nope"])
