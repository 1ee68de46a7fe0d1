"""Benchmarks: speed and memory, measured side by side in one run.

    python train/bench.py attention [--lengths 4096,8192,16384] [--heads 8] [--head-dim 64]

`attention` runs jpe's blocked attention (causal, ALiBi bias asked per block) forward at each
length, each in a fresh subprocess so that its peak resident memory (the process high-water
mark, VmHWM) is its own, and prints the peak and the time of one jitted call after warm-up.
With `--dense`, a dense softmax(q k^T + bias) v with the full [H, L, L] ALiBi bias runs beside
it for comparison at the lengths where it fits.

    python train/bench.py train [--pe none,rope,alibi,t5,kerple,fire] [--steps 30] [--rounds 5]

`train` measures training steps per second at the reference configuration (batch 16, length
128, d_model 128, 4 layers, 4 heads, vocab 256: the jitted step of `train/lm.py`, optimiser
included) for each encoding, in one process, interleaving the encodings round by round so that
a noisy machine slows them alike, and prints the median time per step and its ratio to `none`.
If PyTorch and x-transformers are importable, the same configuration runs in x-transformers
beside it.

The persistent compilation cache of the other command lines (`jpe.lab.cli.
enable_compilation_cache`) is deliberately not turned on here: every measurement compiles
cold, in a process that shares nothing on disk with earlier runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


def _attention_worker(length: int, heads: int, head_dim: int, block: int, dense: bool) -> dict:
    import jax
    import jax.numpy as jnp

    import jpe

    slopes = jpe.alibi_slopes(heads)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(key, (1, length, heads, head_dim)) for key in keys)
    before = _peak_rss_mib()

    if dense:

        def run(q, k, v):
            positions = jnp.arange(length)
            bias = jpe.alibi_bias(positions, positions, slopes)  # [H, L, L]
            s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / head_dim**0.5 + bias[None]
            s = jnp.where(jnp.tril(jnp.ones((length, length), bool)), s, -jnp.inf)
            return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)

    else:

        def run(q, k, v):
            return jpe.attention(
                q,
                k,
                v,
                causal=True,
                block_size=block,
                bias_fn=lambda qp, kp: jpe.alibi_bias(qp, kp, slopes),
            )

    fn = jax.jit(run)
    fn(q, k, v).block_until_ready()  # compile and warm up
    start = time.perf_counter()
    fn(q, k, v).block_until_ready()
    seconds = time.perf_counter() - start
    return {"peak_mib": _peak_rss_mib(), "inputs_mib": before, "seconds": seconds}


def attention(args) -> None:
    lengths = [int(x) for x in args.lengths.split(",")]
    modes = ["blocked"] + (["dense"] if args.dense else [])
    print(
        f"causal ALiBi attention forward, batch 1, {args.heads} heads of {args.head_dim}, "
        f"block {args.block_size}, {os.cpu_count()} CPU cores, jax on "
        f"{_backend()}"
    )
    print(f"{'L':>7} {'mode':>8} {'peak RSS (MiB)':>15} {'time (s)':>9}")
    for length in lengths:
        for mode in modes:
            cmd = [
                sys.executable,
                __file__,
                "_attention_worker",
                json.dumps([length, args.heads, args.head_dim, args.block_size, mode == "dense"]),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                tail = (proc.stderr.strip().splitlines() or ["killed"])[-1]
                print(f"{length:>7} {mode:>8} {'failed: ' + tail[:60]:>15}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{length:>7} {mode:>8} {r['peak_mib']:>15,.0f} {r['seconds']:>9.2f}")


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def train(args) -> None:
    import jax
    import numpy as np

    import jpe
    from jpe.lab import data as data_lib
    from jpe.lab import sharding
    from jpe.lab.train import TrainConfig, init_training

    pes = [p for p in args.pe.split(",") if p] if args.pe != "all" else list(jpe.ENCODINGS)
    if "none" not in pes:
        pes.insert(0, "none")
    for pe in pes:
        if pe not in jpe.ENCODINGS:
            raise SystemExit(f"error: unknown --pe {pe!r}; valid: {', '.join(jpe.ENCODINGS)}")
    mesh = sharding.make_mesh(None)
    tokens = data_lib.load_corpus(None).train
    batches = data_lib.Batches(tokens, batch_size=args.batch_size, seq_len=args.seq_len, seed=0)
    runs = {}
    for pe in pes:
        model = jpe.TransformerConfig(
            pe=pe,
            d_model=args.d_model,
            num_layers=args.num_layers,
            num_heads=args.num_heads,
            max_len=args.seq_len,
        )
        cfg = TrainConfig(model=model, batch_size=args.batch_size, seq_len=args.seq_len)
        run = init_training(cfg, mesh, tuple(batches.batch(0)))
        batch = jax.device_put(batches.batch(0), run.batch_shardings)
        state = [run.params, run.opt_state]
        for i in range(3):  # compile and warm up
            state[0], state[1], loss = run.step(*state, batch, np.int32(i))
        loss.block_until_ready()
        runs[pe] = (run, batch, state)
    times = {pe: [] for pe in pes}
    for _ in range(args.rounds):
        for pe in pes:
            run, batch, state = runs[pe]
            start = time.perf_counter()
            for i in range(args.steps):
                state[0], state[1], loss = run.step(*state, batch, np.int32(i))
            loss.block_until_ready()
            times[pe].append((time.perf_counter() - start) / args.steps)
    tokens = args.batch_size * args.seq_len
    print(
        f"training step, batch {args.batch_size} x length {args.seq_len}, d_model "
        f"{args.d_model}, {args.num_layers} layers, {args.num_heads} heads, vocab 256; "
        f"median of {args.rounds} rounds of {args.steps} steps; {os.cpu_count()} CPU cores, "
        f"jax {jax.__version__} on {_backend()}"
    )
    print(f"{'pe':>12} {'ms/step':>8} {'tokens/s':>9} {'vs none':>8}")
    base = _median(times["none"])
    for pe in pes:
        t = _median(times[pe])
        print(f"{pe:>12} {1e3 * t:>8.1f} {tokens / t:>9,.0f} {t / base:>7.2f}x")
    _x_transformers(args, pes, base)


def _x_transformers(args, pes, base) -> None:
    try:
        import torch  # noqa: F401
        import x_transformers  # noqa: F401
    except ImportError:
        print("x-transformers: not installed (pip install torch x-transformers to compare)")
        return
    import torch
    from x_transformers import Decoder, TransformerWrapper

    options = {"none": {}, "rope": {"rotary_pos_emb": True}, "alibi": {"alibi_pos_bias": True},
               "t5": {"rel_pos_bias": True}}  # fmt: skip
    print(f"{'x-transformers':>12} {'ms/step':>8} {'tokens/s':>9} {'vs jpe none':>12}")
    for pe in pes:
        if pe not in options:
            continue
        model = TransformerWrapper(
            num_tokens=256,
            max_seq_len=args.seq_len,
            use_abs_pos_emb=False,
            attn_layers=Decoder(
                dim=args.d_model, depth=args.num_layers, heads=args.num_heads, **options[pe]
            ),
        )
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x = torch.randint(0, 256, (args.batch_size, args.seq_len + 1))
        samples = []
        for r in range(args.rounds + 1):
            start = time.perf_counter()
            for _ in range(args.steps):
                logits = model(x[:, :-1])
                loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, 256), x[:, 1:].reshape(-1)
                )
                opt.zero_grad()
                loss.backward()
                opt.step()
            if r:  # the first round warms up
                samples.append((time.perf_counter() - start) / args.steps)
        t = _median(samples)
        tokens = args.batch_size * args.seq_len
        print(f"{pe:>12} {1e3 * t:>8.1f} {tokens / t:>9,.0f} {t / base:>11.2f}x")


def _backend() -> str:
    import jax

    return jax.default_backend()


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_attention_worker"]:
        print(json.dumps(_attention_worker(*json.loads(argv[1]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("attention", help="peak memory and time of blocked attention")
    p.add_argument("--lengths", default="4096,8192,16384")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--dense", action="store_true", help="also run dense attention")
    p = sub.add_parser("train", help="training steps per second for each encoding")
    p.add_argument("--pe", default="none,rope,alibi,t5,kerple,fire", help="list, or 'all'")
    p.add_argument("--steps", type=int, default=30, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=4)
    args = parser.parse_args(argv)
    {"attention": attention, "train": train}[args.command](args)


if __name__ == "__main__":
    main()
