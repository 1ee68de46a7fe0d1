"""The default: a 4-layer byte-level decoder on the built-in corpus, for a laptop CPU.

    python train/lm.py --pe=rope                # same as --config=tiny

Hardware: 2 CPU cores. Run time and expected validation perplexity: see README.md
("Training"), measured with this preset.
"""

CONFIG = dict(
    d_model=128,
    num_layers=4,
    num_heads=4,
    seq_len=128,
    batch_size=16,
    steps=1000,
    lr=3e-3,
    warmup=100,
    checkpoint_every=250,
)
