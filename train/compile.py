"""Compile the sharded train step of `train/lm.py` ahead of time for a TPU topology.

    python train/compile.py --topology=v5e:2x2 --pe=alibi --seq-len=8192
    python train/compile.py --platform=gpu --pe=alibi --seq-len=8192   # lowering for CUDA

needs `libtpu` (`pip install "jpe[tpu]"`), not a TPU: the devices come from
`jax.experimental.topologies.get_topology_desc`, the step is lowered from `ShapeDtypeStruct`s
carrying their shardings (parameters and Adam moments split as `jpe.lab.sharding` splits them,
the batch over `data`), compiled with `.lower().compile()`, and the compiler's per-device
memory (`memory_analysis()`) and cost estimates (`cost_analysis()`) are printed. Attention is
built for TPU: the fused Pallas kernel (Mosaic) for the encodings it serves, unless
`--attention` says otherwise. Exit status 4 when the step does not fit a device's HBM (or the
compiler runs out of it). `--platform=gpu` lowers the same step for CUDA instead (Triton
kernels; the mesh is made of this machine's devices), which shows lowering errors but no
memory figures. Every other flag is `train/lm.py`'s.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

# libtpu allows one process at a time unless told otherwise; compiling needs no chip.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# HBM per chip, GiB, by the topology name's generation (published TPU specifications).
HBM_GIB = {"v4": 32, "v5e": 16, "v5litepod": 16, "v5p": 95, "v6e": 32}


def _gib(n: float) -> str:
    return f"{n / 2**30:.3f} GiB"


def _opt_shardings(opt_state, p_shardings, replicated):
    """Each Adam moment takes its parameter's sharding; counters and the rest are replicated."""
    import jax

    def pick(path, leaf):
        for key in path:
            name = getattr(key, "key", None)
            if name in p_shardings and tuple(leaf.shape) == tuple(p_shardings[name][1]):
                return p_shardings[name][0]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, opt_state)


def compile_step(cfg, topology: str):
    """`(compiled, mesh)`: the train step of `cfg` (a `TrainConfig`) compiled for `topology`."""
    import jax
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    lowered, mesh = lower_step(cfg, topo.devices, "tpu")
    # An executable compiled for a topology has no client to load it back, so an entry in the
    # persistent compilation cache could only fail to load later (JAX warns and compiles
    # again): this compile writes none.
    key = "jax_persistent_cache_min_compile_time_secs"
    before = getattr(jax.config, key)
    jax.config.update(key, float("inf"))
    try:
        return lowered.compile(), mesh
    finally:
        jax.config.update(key, before)


def lower_step(cfg, devices, platform: str):
    """`(lowered, mesh)`: the sharded train step of `cfg` lowered over `devices` with
    attention built for `platform` ("tpu", or "gpu": lowered for CUDA, whatever `devices`
    are, so that Triton lowering errors show on a CPU machine)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from jpe.attention import target_backend
    from jpe.encodings.positions import randomized_positions
    from jpe.lab import core, sharding
    from jpe.nn.transformer import Transformer

    devices = np.asarray(devices)
    data, model_axis = sharding.parse_mesh(cfg.mesh, devices.size)
    mesh = Mesh(devices.reshape(data, model_axis), ("data", "model"))
    if cfg.batch_size % data:
        raise ValueError(
            f"batch_size ({cfg.batch_size}) must be a multiple of the mesh's data axis ({data})"
        )
    tx, _ = core.make_optimizer(
        lr=cfg.lr, steps=cfg.steps, warmup=cfg.warmup, weight_decay=cfg.weight_decay, clip=cfg.clip
    )
    abstract = nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(cfg.seed)))
    build, params = core.flatten_model(abstract)
    shapes = {k: (v.shape, v.dtype) for k, v in params.items()}
    p_shardings = {
        k: NamedSharding(mesh, sharding._spec(sharding.logical_axes(k, s), s, mesh))
        for k, (s, _) in shapes.items()
    }
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_params = {
        k: jax.ShapeDtypeStruct(s, d, sharding=p_shardings[k]) for k, (s, d) in shapes.items()
    }
    opt_shape = jax.eval_shape(tx.init, abstract_params)
    o_shardings = _opt_shardings(
        opt_shape, {k: (p_shardings[k], shapes[k][0]) for k in shapes}, replicated
    )
    abstract_opt = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), opt_shape, o_shardings
    )
    rows = (cfg.batch_size, cfg.seq_len)
    keys = {"inputs": jnp.int32, "targets": jnp.int32, "weights": jnp.float32}
    if cfg.pack:
        keys |= {"segment_ids": jnp.int32, "positions": jnp.int32}
    b_sharding = sharding.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct(rows, d, sharding=b_sharding) for k, d in keys.items()}
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)

    def positions_fn(batch, step):
        if cfg.random_positions is None:
            return batch.get("positions")
        key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), step)
        return randomized_positions(key, batch["inputs"].shape, cfg.random_positions)

    step_fn = core.make_step(build, tx, positions_fn)
    jitted = jax.jit(
        step_fn,
        in_shardings=(p_shardings, o_shardings, {k: b_sharding for k in keys}, replicated),
        out_shardings=(p_shardings, o_shardings, replicated),
        donate_argnums=(0, 1),
    )
    with jax.set_mesh(mesh), target_backend(platform):
        if platform == "gpu":
            traced = jitted.trace(abstract_params, abstract_opt, batch, step)
            return traced.lower(lowering_platforms=("cuda",)), mesh
        return jitted.lower(abstract_params, abstract_opt, batch, step), mesh


def main(argv=None) -> int:
    from jpe.lab import cli
    from train import lm

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default="tiny")
    try:
        preset = cli.load_preset(lm.CONFIGS, pre.parse_known_args(argv)[0].config)
    except ValueError:
        preset = None
    p = lm.parser(preset)
    p.description = __doc__
    p.add_argument("--topology", default="v5e:2x2", help="TPU topology, e.g. v5e:2x2, v5p:2x2x1")
    p.add_argument(
        "--platform",
        choices=("tpu", "gpu"),
        default="tpu",
        help="tpu: compile for --topology and print memory; gpu: lower for CUDA only (this "
        "machine's devices make the mesh; no memory figures without a GPU)",
    )
    args = p.parse_args(argv)
    try:
        cfg = lm.build_config(args)
        if args.attention is None:
            from jpe.attention import choose_implementation

            hooks = cfg.model.encoding.capabilities()
            choice = choose_implementation(
                None,
                bias_fn=True if hooks.bias else None,
                query_bias_fn=True if hooks.query_bias else None,
                value_fn=True if hooks.value else None,
                contextual_bias_fn=True if hooks.contextual_bias else None,
                dtype=cfg.model.dtype,
                backend=args.platform,
            )
            cfg = dataclasses.replace(cfg, model=cfg.model.replace(attention=choice))
        target = args.topology if args.platform == "tpu" else "CUDA (lowering only)"
        print(
            f"compiling the train step: pe={cfg.model.pe} attention={cfg.model.attention} "
            f"seq_len={cfg.seq_len} batch_size={cfg.batch_size} for {target}",
            flush=True,
        )
        if args.platform == "gpu":
            import jax

            try:
                lowered, mesh = lower_step(cfg, jax.devices(), "gpu")
            except RuntimeError as e:
                if "cudnn" not in str(e).lower():
                    raise
                print(
                    f"error: attention={cfg.model.attention} cannot be lowered without a GPU "
                    f"(JAX looks for cuDNN while tracing: {str(e).splitlines()[0]}); "
                    f"--attention=pallas lowers the fused kernel instead",
                    file=sys.stderr,
                )
                return 2
            text = lowered.as_text()
            print(
                f"lowered for CUDA on mesh {dict(mesh.shape)}: {len(text):,} characters of "
                f"StableHLO, {text.count('__gpu$xla.gpu.triton')} Triton kernel calls, "
                f"{text.count('cudnn')} cuDNN mentions"
            )
            return 0
        compiled, mesh = compile_step(cfg, args.topology)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # the compiler's own errors, out-of-memory among them
        text = str(e)
        if "RESOURCE_EXHAUSTED" in text or "memory" in text.lower():
            print(
                f"error: the step does not fit in memory (HBM, or VMEM for a kernel): "
                f"{text[:2000]}",
                file=sys.stderr,
            )
            return 4
        raise
    mem = compiled.memory_analysis()
    used = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
        + mem.generated_code_size_in_bytes
    )
    print(f"mesh {dict(mesh.shape)} on {mesh.devices.size} devices ({mesh.devices.flat[0]})")
    print("memory per device (the SPMD program, the same on each):")
    for name in ("argument", "output", "alias", "temp", "generated_code"):
        print(f"  {name:>15}: {_gib(getattr(mem, f'{name}_size_in_bytes'))}")
    print(f"  {'total':>15}: {_gib(used)}")
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    print("compiler's cost estimate per device:")
    for key in ("flops", "bytes accessed"):
        if cost and key in cost:
            print(f"  {key:>15}: {cost[key]:.4g}")
    generation = args.topology.split(":")[0]
    hbm = HBM_GIB.get(generation)
    if hbm is None:
        print(f"(no HBM size known for {generation!r}; not checked)")
        return 0
    if used > hbm * 2**30:
        print(
            f"error: the step needs {_gib(used)} per device, more than a {generation} chip's "
            f"{hbm} GiB of HBM",
            file=sys.stderr,
        )
        return 4
    print(f"fits: {_gib(used)} of {hbm} GiB HBM per device")
    return 0


if __name__ == "__main__":
    sys.exit(main())
