"""`train/bench.py kernels`: the table's rows, its FLOP count and its refusals (tiny shapes;
the figures themselves are measured by the command, never by tests)."""

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
