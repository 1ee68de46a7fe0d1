"""A short tour of jpe's pure functions, on the CPU in a few seconds.

    python train/tour.py

Prints what the functions compute and why their numerics matter: the phase error of RoPE angles
at large positions (jpe's exact reduction against the plain float32 product), and the shapes
and first values of each family of encodings.
"""

from __future__ import annotations

import numpy as np

import jpe


def _phase_error(angles, positions, inv_freq) -> float:
    exact = positions.astype(np.longdouble)[:, None] * inv_freq.astype(np.longdouble)[None, :]
    diff = np.asarray(angles, np.longdouble) - exact
    two_pi = 2 * np.longdouble(np.pi)
    return float(np.abs(diff - two_pi * np.round(diff / two_pi)).max())


def rope_precision() -> None:
    inv_freq, _ = jpe.rope_frequencies(128, base=500000.0)
    print("RoPE phase error (rad), 128 rotary dims, base 5e5, 256 positions from p:")
    print(f"{'p':>12} {'float32 p*inv_freq':>20} {'jpe.rope_angles':>18}")
    for exponent in (10, 14, 17, 20, 24, 28):
        positions = np.arange(2**exponent, 2**exponent + 256, dtype=np.int64)
        naive = positions.astype(np.float32)[:, None] * inv_freq.astype(np.float32)[None, :]
        exact = jpe.rope_angles(positions.astype(np.int32), inv_freq)
        print(
            f"{'2^' + str(exponent):>12} {_phase_error(naive, positions, inv_freq):>20.2e} "
            f"{_phase_error(exact, positions, inv_freq):>18.2e}"
        )


def rope_scalings() -> None:
    print("\nRoPE scalings: wavelengths (tokens) of pairs 0, 32, 48 and 63 of 64, base 5e5")
    scalings = {
        "default": None,
        "linear x8": {"rope_type": "linear", "factor": 8.0},
        "ntk x8": {"rope_type": "ntk", "factor": 8.0},
        "yarn x8": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8192},
        "llama3 x8": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    }
    for name, scaling in scalings.items():
        inv_freq, attention_factor = jpe.rope_frequencies(128, base=500000.0, scaling=scaling)
        wavelengths = " ".join(f"{w:>12,.0f}" for w in 2 * np.pi / inv_freq[[0, 32, 48, 63]])
        print(f"  {name:<10} {wavelengths}   attention_factor {attention_factor:.4f}")


def main() -> None:
    rope_precision()
    rope_scalings()


if __name__ == "__main__":
    main()
