"""Process set-up that has to happen before Python starts: the command lines call
`restart_with_tuned_malloc()` first thing.

XLA:CPU allocates each step's temporaries with `malloc` (160 MB for `train/bench.py train`'s
reference step). glibc serves a request that large with a fresh `mmap` and unmaps it on `free`,
so every step the kernel faults in and zeroes every 4 KiB page again: 43,600 page faults and
95 ms of system time per step were measured on the reference step (`train/bench.py train`,
2 CPU cores), about 40% of its wall time. glibc's tunable `glibc.malloc.hugetlb=1` makes
malloc ask for transparent huge pages (2 MiB) for such mappings: 430 faults a step. Tunables
are read when the process starts, so the command line restarts itself once with it set.

It is on by default; `JPE_MALLOC_TUNING=0` (or a `GLIBC_TUNABLES` that already names
`glibc.malloc.hugetlb`) leaves the process as it is. It does nothing off Linux/glibc. In your
own scripts and notebooks, export it before starting Python:

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python my_script.py
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"


def tuned_environment(environ=None) -> dict | None:
    """The environment to restart with, or None when there is nothing to change."""
    env = dict(os.environ if environ is None else environ)
    if env.get("JPE_MALLOC_TUNING", "1").strip().lower() in ("0", "off", "false", "no"):
        return None
    current = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in current:
        return None
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    env["GLIBC_TUNABLES"] = f"{current}:{TUNABLE}" if current else TUNABLE
    return env


def restart_with_tuned_malloc() -> None:
    """Replaces this process with the same command line under `tuned_environment()`; returns
    (doing nothing) when no change is needed."""
    env = tuned_environment()
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
