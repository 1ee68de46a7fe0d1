"""Device meshes and logical axis names: how parameters and batches are laid out.

The training step is one `jax.jit` with explicit in/out shardings over a `Mesh` with axes
`("data", "model")` (the pjit model). Parameters carry logical axis names derived from their
place in the model: attention heads and the MLP's hidden units split over `model`, everything
else is replicated; batches split over `data`.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "LOGICAL_RULES",
    "batch_sharding",
    "logical_axes",
    "make_mesh",
    "maybe_initialize_distributed",
    "param_shardings",
    "parse_mesh",
]

#: logical axis name -> mesh axis (None: replicated)
LOGICAL_RULES = {"batch": "data", "heads": "model", "mlp": "model", "embed": None, "vocab": None}


def maybe_initialize_distributed() -> bool:
    """Calls `jax.distributed.initialize()` when the environment describes several hosts.

    Cloud TPU pods and SLURM are detected by JAX itself; elsewhere set
    JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
    """
    markers = ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID")
    if any(os.environ.get(m) for m in markers) and jax.process_count() == 1:
        try:
            jax.distributed.initialize()
        except (RuntimeError, ValueError) as e:  # single host after all
            if "already" not in str(e):
                return False
        return True
    return False


def parse_mesh(spec: str | None, num_devices: int) -> tuple[int, int]:
    """`"DATAxMODEL"` -> (data, model); None puts every device on `data`.

    Raises:
      ValueError: a malformed spec, or one whose product is not the number of devices.
    """
    if spec is None or spec == "":
        return num_devices, 1
    parts = spec.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--mesh must look like DATAxMODEL, e.g. 4x2; got {spec!r}")
    data, model = int(parts[0]), int(parts[1])
    if data * model != num_devices:
        raise ValueError(
            f"--mesh {spec} needs {data * model} devices, but {num_devices} are available "
            f"({jax.default_backend()}); use DATAxMODEL with DATA * MODEL = {num_devices}"
        )
    return data, model


def make_mesh(spec: str | None = None) -> Mesh:
    """A `("data", "model")` mesh over all devices, shaped by `spec` (see `parse_mesh`)."""
    devices = jax.devices()
    data, model = parse_mesh(spec, len(devices))
    return Mesh(np.asarray(devices).reshape(data, model), ("data", "model"))


def logical_axes(name: str, shape: tuple[int, ...]) -> tuple[str | None, ...]:
    """Logical axis names of the parameter at path `name` (e.g. `blocks/0/attn/q/kernel`)."""
    parts = name.split("/")
    leaf, layer = parts[-1], parts[-2] if len(parts) > 1 else ""
    if layer in ("q", "k", "v") and leaf == "kernel":
        return ("embed", "heads")
    if layer == "o" and leaf == "kernel":
        return ("heads", "embed")
    if layer == "up":
        return ("embed", "mlp") if leaf == "kernel" else ("mlp",)
    if layer == "down" and leaf == "kernel":
        return ("mlp", "embed")
    return (None,) * len(shape)


def _spec(axes, shape, mesh: Mesh) -> PartitionSpec:
    mesh_axes = []
    for axis, size in zip(axes, shape, strict=True):
        target = LOGICAL_RULES.get(axis) if axis else None
        # A dimension that does not divide by the mesh axis stays replicated.
        if target is not None and size % mesh.shape[target]:
            target = None
        mesh_axes.append(target)
    return PartitionSpec(*mesh_axes)


def param_shardings(params: dict, mesh: Mesh) -> dict:
    """`NamedSharding` per parameter of a flat `{path: array}` dict."""
    return {
        name: NamedSharding(mesh, _spec(logical_axes(name, np.shape(p)), np.shape(p), mesh))
        for name, p in params.items()
    }


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Batches `[B, ...]` split over `data`."""
    return NamedSharding(mesh, PartitionSpec("data", *([None] * (ndim - 1))))
