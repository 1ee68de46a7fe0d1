"""Benchmarks: speed and memory, measured side by side in one run.

    python train/bench.py attention [--lengths 4096,8192,16384] [--heads 8] [--head-dim 64]

`attention` runs jpe's blocked attention (causal, ALiBi bias asked per block) forward at each
length, each in a fresh subprocess so that its peak resident memory (the process high-water
mark, VmHWM) is its own, and prints the peak and the time of one jitted call after warm-up.
With `--dense`, a dense softmax(q k^T + bias) v with the full [H, L, L] ALiBi bias runs beside
it for comparison at the lengths where it fits.

    python train/bench.py train [--pe none,rope,alibi,t5,kerple,fire] [--steps 10] [--rounds 7]

`train` measures the time of one training step at the reference configuration (batch 16,
length 128, d_model 128, 4 layers, 4 heads, vocab 256, AdamW: the jitted step of
`train/lm.py`) for each encoding, and the same model and step in x-transformers (PyTorch, CPU)
for the encodings it has (none, rope, alibi, t5), all in one process. The libraries and
encodings take turns round by round, so that a slow spell of a shared machine slows them
alike, and each figure is the median of the rounds. It prints one table: milliseconds per
step, the ratio to jpe's `none`, jpe's time over x-transformers', and each runner's minor page
faults per step (`getrusage`: a step that faults in its buffers anew every time shows
thousands). It needs the `bench`
extra (`pip install -e ".[bench]"`: PyTorch's CPU build and x-transformers).

    python train/bench.py profile [--pe t5] [--steps 5] [--top 10] [--trace-dir DIR]

`profile` traces jpe's training step for one encoding at the same reference configuration
with `jax.profiler` and prints where its time goes: milliseconds per step and share of the
ops' time summed over the runtime's threads, by JAX primitive (`dot_general`, and
`dot_general (backward)` for the cotangent side) and by HLO instruction of the compiled
step, with shapes, and the FLOP of a step by XLA's cost analysis. The trace stays in
`--trace-dir` for TensorBoard or xprof (without it, in a temporary folder removed at the
end). The profiler
slows the step, so take shares from it, and times from `train`.

    python train/bench.py kernels [--pe none,rope,alibi,t5,kerple,fire] [--lengths 1024,4096,16384]
        [--head-dims 64,128] [--implementations pallas,cudnn,xla] [--passes fwd,fwdbwd]

`kernels` measures attention alone, causal, in bfloat16, as FlashAttention-2's benchmark does
(Dao 2023, arXiv 2307.08691, section 4.1): 16k tokens a batch (batch = 16384 // L), hidden
size 2048 (heads = 2048 // head dim), TFLOP/s from 4 * B * H * L^2 * D / 2 for the causal
forward and 2.5 times that for the backward. Each encoding runs with each implementation
that serves it: jpe's fused Pallas kernel (the bias computed inside it), jpe's blocked XLA
path, and `jax.nn.dot_product_attention(implementation="cudnn")`, bias-free (`none`, and
`rope` after the rotation) or with ALiBi's bias materialised as a `[1, H, L, L]` array where
it fits. Rotary encodings rotate q and k inside the timed function. It prints one table:
milliseconds (median of `--repeats` calls after a warm-up), TFLOP/s, the compiled program's
temporary memory (`memory_analysis()`, so that linear memory in L shows) and each time over
cuDNN's bias-free time and over the same implementation's `none`. On CPU only the XLA path is
timed by default, at L = 1024 (`--implementations pallas` runs the kernel in interpret mode:
a check that it runs, not a kernel's speed).

The commands restart themselves once with glibc's malloc tuned for XLA:CPU
(`train/_runtime.py`; `JPE_MALLOC_TUNING=0` to measure without), so both libraries run under
the same allocator settings.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path


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


# x-transformers' options for the encodings it has (Wang's x-transformers, its README's names).
X_TRANSFORMERS = {
    "none": {},
    "rope": {"rotary_pos_emb": True},
    "alibi": {"alibi_pos_bias": True},
    "t5": {"rel_pos_bias": True},
}


def _jpe_step(args, pe, batches):
    """jpe's training state at the reference configuration: `(state, batch)`, where
    `state.step(params, opt_state, batch, step)` is `train/lm.py`'s jitted step."""
    import jax

    import jpe
    from jpe.lab import sharding
    from jpe.lab.train import TrainConfig, init_training

    model = jpe.TransformerConfig(
        pe=pe,
        d_model=args.d_model,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        max_len=args.seq_len,
    )
    cfg = TrainConfig(model=model, batch_size=args.batch_size, seq_len=args.seq_len)
    state = init_training(cfg, sharding.make_mesh(None), tuple(batches.batch(0)))
    return state, jax.device_put(batches.batch(0), state.batch_shardings)


def _jpe_runner(args, pe, batches):
    """One jitted jpe train step at the reference configuration; returns `run(n)`, which takes
    n steps and waits for the last."""
    import numpy as np

    state, batch = _jpe_step(args, pe, batches)
    carry = [state.params, state.opt_state]

    def run(n):
        for i in range(n):
            carry[0], carry[1], loss = state.step(*carry, batch, np.int32(i))
        loss.block_until_ready()

    return run


def _x_transformers_runner(args, pe, batches):
    """The same model and step in x-transformers (PyTorch, CPU): a pre-norm decoder of the same
    width, depth and heads, AdamW, next-token cross-entropy on the same batch."""
    import torch
    from x_transformers import Decoder, TransformerWrapper

    model = TransformerWrapper(
        num_tokens=256,
        max_seq_len=args.seq_len,
        use_abs_pos_emb=False,
        attn_layers=Decoder(
            dim=args.d_model, depth=args.num_layers, heads=args.num_heads, **X_TRANSFORMERS[pe]
        ),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    b = batches.batch(0)
    x = torch.as_tensor(b["inputs"], dtype=torch.long)
    y = torch.as_tensor(b["targets"], dtype=torch.long)

    def run(n):
        for _ in range(n):
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), y.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()

    return run


def train(args) -> None:
    import jax

    import jpe
    from jpe.lab import data as data_lib

    pes = [p for p in args.pe.split(",") if p] if args.pe != "all" else list(jpe.ENCODINGS)
    if "none" not in pes:
        pes.insert(0, "none")
    for pe in pes:
        if pe not in jpe.ENCODINGS:
            raise SystemExit(f"error: unknown --pe {pe!r}; valid: {', '.join(jpe.ENCODINGS)}")
    if args.rounds < 1 or args.steps < 1:
        raise SystemExit("error: --rounds and --steps must be >= 1")
    try:
        import torch
        import x_transformers
    except ImportError as e:
        raise SystemExit(
            f"error: the comparison needs the bench extra ({e}); install it with "
            "pip install -e '.[bench]'"
        ) from e
    tokens = data_lib.load_corpus(None).train
    batches = data_lib.Batches(tokens, batch_size=args.batch_size, seq_len=args.seq_len, seed=0)
    runners = {}
    for pe in pes:
        runners[("jpe", pe)] = _jpe_runner(args, pe, batches)
        if pe in X_TRANSFORMERS:
            runners[("x-transformers", pe)] = _x_transformers_runner(args, pe, batches)
    for run in runners.values():  # compile (jpe) and warm up (both)
        run(3)
    # Round by round, every (library, encoding) in turn: a slow spell of a shared machine
    # slows them alike, and the median of the rounds drops it.
    times = {key: [] for key in runners}
    faults = {key: [] for key in runners}
    for _ in range(args.rounds):
        for key, run in runners.items():
            # A pause, untimed, between turns: each library's worker threads spin for a while
            # after its work, and would otherwise slow whichever runner comes next.
            time.sleep(args.pause)
            before = resource.getrusage(resource.RUSAGE_SELF)
            start = time.perf_counter()
            run(args.steps)
            times[key].append((time.perf_counter() - start) / args.steps)
            after = resource.getrusage(resource.RUSAGE_SELF)
            faults[key].append((after.ru_minflt - before.ru_minflt) / args.steps)
    med = {key: _median(t) for key, t in times.items()}
    med_faults = {key: _median(f) for key, f in faults.items()}
    spread = {key: (min(t), max(t)) for key, t in times.items()}
    tokens_per_step = args.batch_size * args.seq_len
    print(
        f"training step, batch {args.batch_size} x length {args.seq_len}, d_model "
        f"{args.d_model}, {args.num_layers} layers, {args.num_heads} heads, vocab 256, AdamW; "
        f"median of {args.rounds} interleaved rounds of {args.steps} steps; "
        f"{os.cpu_count()} CPU cores; jax {jax.__version__} on {_backend()}, torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads), x-transformers "
        f"{getattr(x_transformers, '__version__', _version('x-transformers'))}; "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}"
    )
    print(
        f"{'pe':>12} {'jpe ms':>7} {'(min-max)':>13} {'tokens/s':>9} {'vs none':>8} "
        f"{'faults':>7} {'x-t ms':>7} {'(min-max)':>13} {'jpe / x-t':>10} {'faults':>7}"
    )
    base = med[("jpe", "none")]
    for pe in pes:
        t = med[("jpe", pe)]
        lo, hi = spread[("jpe", pe)]
        row = (
            f"{pe:>12} {1e3 * t:>7.1f} {f'({1e3 * lo:.0f}-{1e3 * hi:.0f})':>13} "
            f"{tokens_per_step / t:>9,.0f} {t / base:>7.2f}x {med_faults[('jpe', pe)]:>7,.0f}"
        )
        if ("x-transformers", pe) in med:
            x = med[("x-transformers", pe)]
            xlo, xhi = spread[("x-transformers", pe)]
            row += (
                f" {1e3 * x:>7.1f} {f'({1e3 * xlo:.0f}-{1e3 * xhi:.0f})':>13} {t / x:>9.2f}x"
                f" {med_faults[('x-transformers', pe)]:>7,.0f}"
            )
        print(row)
    print(
        "faults: minor page faults per step (getrusage, median of the rounds); thousands per "
        "step mean the allocator returns and re-faults the step's buffers (see train/_runtime.py)"
    )


# ---------------------------------------------------------------------------------------------
# profile: where the train step's time goes, op by op
# ---------------------------------------------------------------------------------------------

# One instruction of an HLO module's text: name, shape (tuples included), opcode, the rest.
_HLO_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([\w\-]+)\((.*)$", re.M)


def hlo_instructions(hlo_text: str) -> dict[str, tuple[str, str, str]]:
    """`{name: (shape, opcode, jax op name)}` for every instruction of a compiled module's HLO
    text; the jax op name is its `op_name` metadata ("" when it has none)."""
    out = {}
    for name, shape, opcode, rest in _HLO_INSTRUCTION.findall(hlo_text):
        op = re.search(r'op_name="([^"]*)"', rest)
        out[name] = (shape, opcode, op.group(1) if op else "")
    return out


def jax_op(op_name: str) -> str:
    """The primitive an `op_name` ends in, and whether it belongs to the backward pass (JAX names
    the cotangent computations `transpose(jvp(...))`): "dot_general", "dot_general (backward)"."""
    if not op_name:
        return "(no jax op)"
    primitive = op_name.rsplit("/", 1)[-1]
    return f"{primitive} (backward)" if "transpose(" in op_name else primitive


def op_times(xspace_file: str, instructions: dict) -> tuple[dict[str, float], dict[str, int]]:
    """Seconds and event counts per HLO instruction in a `jax.profiler` trace, summed over the
    runtime's threads. Events that are not instructions of the module (the runtime's own
    bookkeeping, Python) are left out."""
    import jax

    data = jax.profiler.ProfileData.from_file(xspace_file)
    seconds, counts = {}, {}
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in instructions:
                    seconds[event.name] = seconds.get(event.name, 0.0) + event.duration_ns * 1e-9
                    counts[event.name] = counts.get(event.name, 0) + 1
    return seconds, counts


def profile(args) -> None:
    import contextlib
    import glob
    import tempfile

    import jax
    import numpy as np

    import jpe
    from jpe.lab import data as data_lib

    if args.pe not in jpe.ENCODINGS:
        raise SystemExit(f"error: unknown --pe {args.pe!r}; valid: {', '.join(jpe.ENCODINGS)}")
    if args.steps < 1 or args.top < 1:
        raise SystemExit("error: --steps and --top must be >= 1")
    tokens = data_lib.load_corpus(None).train
    batches = data_lib.Batches(tokens, batch_size=args.batch_size, seq_len=args.seq_len, seed=0)
    state, batch = _jpe_step(args, args.pe, batches)
    carry = [state.params, state.opt_state]
    compiled = state.step.lower(*carry, batch, np.int32(0)).compile()
    instructions = hlo_instructions(compiled.as_text())
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, list) else cost) or {}
    # The executable whose HLO names the trace's events runs the steps: compiled once.
    for i in range(3):  # warm up
        carry[0], carry[1], loss = compiled(*carry, batch, np.int32(i))
    loss.block_until_ready()
    # Without --trace-dir the trace (tens of MB) goes to a temporary folder, removed once read.
    with contextlib.ExitStack() as stack:
        trace_dir = args.trace_dir or stack.enter_context(
            tempfile.TemporaryDirectory(prefix="jpe-profile-")
        )
        with jax.profiler.trace(trace_dir):
            start = time.perf_counter()
            for i in range(args.steps):
                carry[0], carry[1], loss = compiled(*carry, batch, np.int32(i))
            loss.block_until_ready()
            wall = (time.perf_counter() - start) / args.steps
        files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
        if not files:
            raise SystemExit(f"error: jax.profiler wrote no trace under {trace_dir}")
        seconds, counts = op_times(files[-1], instructions)
    total = sum(seconds.values())
    if not total:
        raise SystemExit("error: the trace holds no event of the step's HLO instructions")
    per_step = lambda t: 1e3 * t / args.steps  # noqa: E731
    print(
        f"train step profile, pe {args.pe}: batch {args.batch_size} x length {args.seq_len}, "
        f"d_model {args.d_model}, {args.num_layers} layers, {args.num_heads} heads; "
        f"{args.steps} traced steps; {os.cpu_count()} CPU cores; jax {jax.__version__} on "
        f"{_backend()}" + (f"; trace in {args.trace_dir}" if args.trace_dir else "")
    )
    print(
        f"wall {1e3 * wall:.1f} ms/step under the profiler; ops {per_step(total):.1f} ms/step "
        f"summed over threads ({len(seconds)} HLO instructions timed); XLA's cost analysis: "
        f"{cost.get('flops', float('nan')) / 1e9:.4g} GFLOP a step"
    )
    by_op = {}
    for name, t in seconds.items():
        key = jax_op(instructions[name][2])
        by_op[key] = by_op.get(key, 0.0) + t
    print(f"\nby jax op (top {args.top})")
    print(f"{'ms/step':>8} {'share':>6}  op")
    for key, t in sorted(by_op.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"{per_step(t):>8.2f} {100 * t / total:>5.1f}%  {key}")
    print(f"\nby HLO instruction (top {args.top})")
    print(f"{'ms/step':>8} {'share':>6} {'calls':>5}  {'instruction':<28} {'shape':<24} op")
    for name, t in sorted(seconds.items(), key=lambda kv: -kv[1])[: args.top]:
        shape, _, op_name = instructions[name]
        print(
            f"{per_step(t):>8.2f} {100 * t / total:>5.1f}% {counts[name] / args.steps:>5.0f}  "
            f"{name:<28} {shape[:24]:<24} {jax_op(op_name)}"
        )


# ---------------------------------------------------------------------------------------------
# kernels: attention alone, every implementation, TFLOP/s
# ---------------------------------------------------------------------------------------------

KERNEL_PES = ("none", "rope", "alibi", "t5", "kerple", "fire")


def _attention_flops(batch: int, heads: int, length: int, head_dim: int, backward: bool):
    """FlashAttention-2's count: 4 B H L^2 D for the two products of the forward pass, halved
    for a causal mask, and 2.5 times the forward's for the backward pass."""
    forward = 4 * batch * heads * length * length * head_dim / 2
    return forward * (3.5 if backward else 1.0)


def _kernel_function(pe: str, implementation: str, length: int, heads: int, head_dim: int):
    """`(f, state)`: `f(q, k, v, state)`, the encoding's attention for `implementation`
    ("pallas", "xla", "cudnn": bias-free, or "cudnn+bias": the bias materialised), with the
    encoding's parameters in `state`; None when that implementation cannot serve `pe`."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import jpe
    from jpe.nn.registry import PositionContext, encoding_class

    cls = encoding_class(pe)
    hooks = cls.capabilities()
    if hooks.query_bias or hooks.value or hooks.contextual_bias:
        return None  # needs the query vectors or whole rows: the XLA path of the full model
    if implementation == "cudnn" and hooks.bias:
        return None
    if implementation == "cudnn+bias" and pe != "alibi":
        return None
    config = jpe.TransformerConfig(
        pe=pe,
        d_model=heads * head_dim,
        num_heads=heads,
        num_layers=1,
        max_len=length,
        dtype="bfloat16",
    )
    graphdef, state = nnx.split(cls(config, rngs=nnx.Rngs(0)))

    def f(q, k, v, state):
        encoding = nnx.merge(graphdef, state)
        batch = q.shape[0]
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        context = PositionContext(
            seq_len=jnp.full((batch,), length, jnp.int32),
            anchor=jnp.zeros((batch,), jnp.int32),
            prepared=encoding.prepare(positions),
        )
        q, k, v = encoding.transform_qkv(q, k, v, positions, layer=0, context=context)
        if implementation == "cudnn+bias":
            bias = encoding.bias(positions[:1], positions[:1]).astype(q.dtype)  # [1, H, L, L]
            return jax.nn.dot_product_attention(
                q, k, v, bias=bias, is_causal=True, implementation="cudnn"
            )
        return jpe.attention(
            q,
            k,
            v,
            bias_fn=encoding.bias if hooks.bias else None,
            causal=True,
            implementation=implementation,
        )

    return f, state


def _time_kernel(f, state, batch, length, heads, head_dim, backward, repeats):
    """`(milliseconds, temp_bytes)`: the median of `repeats` calls of the compiled function
    (forward, or forward and the gradients of q, k, v and the encoding's parameters), and the
    compiler's temporary memory for it."""
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (
        jax.random.normal(key, (batch, length, heads, head_dim), jnp.bfloat16) for key in keys
    )
    if backward:

        def loss(q, k, v, state):
            return f(q, k, v, state).astype(jnp.float32).sum()

        fn = jax.grad(loss, argnums=(0, 1, 2, 3))
    else:
        fn = f
    compiled = jax.jit(fn).lower(q, k, v, state).compile()
    memory = compiled.memory_analysis()
    temp = getattr(memory, "temp_size_in_bytes", 0) if memory is not None else 0
    jax.block_until_ready(compiled(q, k, v, state))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(q, k, v, state))
        times.append(time.perf_counter() - start)
    return 1e3 * _median(times), temp


def kernels(args) -> None:
    import jax

    backend = _backend()
    on_cpu = backend not in ("gpu", "tpu")
    pes = [p for p in args.pe.split(",") if p]
    for pe in pes:
        if pe not in KERNEL_PES:
            raise SystemExit(f"error: --pe {pe!r}: choose from {', '.join(KERNEL_PES)}")
    if args.implementations:
        implementations = [i for i in args.implementations.split(",") if i]
    else:
        implementations = ["xla"] if on_cpu else ["pallas", "xla"]
        if backend == "gpu":
            implementations += ["cudnn", "cudnn+bias"]
    allowed = ("cudnn", "cudnn+bias", "pallas", "xla")  # cuDNN first: the others' reference
    for name in implementations:
        if name not in allowed:
            raise SystemExit(f"error: --implementations {name!r}: choose from {allowed}")
        if name.startswith("cudnn") and backend != "gpu":
            raise SystemExit(f"error: --implementations {name}: cuDNN needs a GPU ({backend})")
    implementations = sorted(set(implementations), key=allowed.index)
    pes = sorted(set(pes), key=KERNEL_PES.index)  # none first: each row's "vs none"
    lengths = [
        int(x) for x in (args.lengths or ("1024" if on_cpu else "1024,4096,16384")).split(",")
    ]
    head_dims = [int(x) for x in args.head_dims.split(",")]
    passes = [p for p in args.passes.split(",") if p]
    for p in passes:
        if p not in ("fwd", "fwdbwd"):
            raise SystemExit(f"error: --passes {p!r}: choose from fwd, fwdbwd")
    for name, values in (("--lengths", lengths), ("--head-dims", head_dims)):
        if not values or min(values) < 1:
            raise SystemExit(f"error: {name} must be positive integers")
    device = jax.devices()[0]
    print(
        f"causal attention, bfloat16, {args.tokens} tokens a batch, hidden {args.d_model}; "
        f"median of {args.repeats} calls; jax {jax.__version__} on {backend} "
        f"({getattr(device, 'device_kind', device.platform)})"
        + (
            "; pallas in interpret mode (not a kernel's speed)"
            if on_cpu and "pallas" in implementations
            else ""
        )
    )
    header = (
        f"{'pe':>7} {'impl':>10} {'pass':>6} {'D':>4} {'L':>6} {'B':>3} {'H':>3} {'ms':>9} "
        f"{'TFLOP/s':>8} {'temp MiB':>9} {'vs cudnn':>9} {'vs none':>8}"
    )
    print(header)
    rows = {}
    for pass_ in passes:
        for head_dim in head_dims:
            heads = max(1, args.d_model // head_dim)
            for length in lengths:
                batch = max(1, args.tokens // length)
                for impl in implementations:
                    for pe in pes:
                        made = _kernel_function(pe, impl, length, heads, head_dim)
                        if made is None:
                            continue
                        key = (pass_, head_dim, length, impl, pe)
                        try:
                            ms, temp = _time_kernel(
                                *made, batch, length, heads, head_dim, pass_ == "fwdbwd",
                                args.repeats,
                            )  # fmt: skip
                        except Exception as error:  # out of memory, or a lowering error
                            text = str(error).strip().splitlines()
                            print(
                                f"{pe:>7} {impl:>10} {pass_:>6} {head_dim:>4} {length:>6} "
                                f"{batch:>3} {heads:>3} failed: {(text or ['?'])[0][:70]}"
                            )
                            continue
                        rows[key] = ms
                        flops = _attention_flops(batch, heads, length, head_dim, pass_ == "fwdbwd")
                        cudnn = rows.get((pass_, head_dim, length, "cudnn", "none"))
                        none = rows.get((pass_, head_dim, length, impl, "none"))
                        print(
                            f"{pe:>7} {impl:>10} {pass_:>6} {head_dim:>4} {length:>6} "
                            f"{batch:>3} {heads:>3} {ms:>9.2f} {flops / ms / 1e9:>8.3g} "
                            f"{temp / 2**20:>9.1f} "
                            f"{(f'{ms / cudnn:.2f}x' if cudnn else '-'):>9} "
                            f"{(f'{ms / none:.2f}x' if none else '-'):>8}",
                            flush=True,
                        )


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


def _backend() -> str:
    import jax

    return jax.default_backend()


def _reference_model_args(p: argparse.ArgumentParser) -> None:
    """The reference configuration's flags, shared by `train` and `profile`."""
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=4)


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
    p.add_argument("--steps", type=int, default=10, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median)")
    p.add_argument(
        "--pause", type=float, default=1.0, help="seconds of rest before each timed turn"
    )
    _reference_model_args(p)
    p = sub.add_parser("profile", help="where one encoding's train step spends its time")
    p.add_argument("--pe", default="none", help="one encoding")
    p.add_argument("--steps", type=int, default=5, help="traced steps")
    p.add_argument("--top", type=int, default=10, help="rows of each table")
    p.add_argument("--trace-dir", default=None, help="keep the trace here (TensorBoard, xprof)")
    _reference_model_args(p)
    p = sub.add_parser("kernels", help="attention alone: TFLOP/s of every implementation")
    p.add_argument("--pe", default=",".join(KERNEL_PES), help="encodings, comma-separated")
    p.add_argument("--lengths", default=None, help="default 1024,4096,16384 (CPU: 1024)")
    p.add_argument("--head-dims", default="64,128")
    p.add_argument(
        "--implementations",
        default=None,
        help="pallas, xla, cudnn, cudnn+bias (default: what the backend serves; CPU: xla)",
    )
    p.add_argument("--passes", default="fwd,fwdbwd", help="fwd and/or fwdbwd")
    p.add_argument("--tokens", type=int, default=16384, help="tokens a batch (B = tokens // L)")
    p.add_argument("--d-model", type=int, default=2048, help="hidden size (H = d_model // D)")
    p.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    commands = {"attention": attention, "train": train, "profile": profile, "kernels": kernels}
    commands[args.command](args)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from train._runtime import restart_with_tuned_malloc

    restart_with_tuned_malloc()  # glibc's malloc, tuned for XLA:CPU (train/_runtime.py)
    main()
