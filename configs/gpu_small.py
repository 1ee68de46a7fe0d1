"""A 12-layer, 768-wide byte-level decoder for one GPU or a TPU v4-8 / v5e-8 slice.

    python train/lm.py --config=gpu_small --pe=rope --data=hf:wikitext:wikitext-103-raw-v1

Hardware: one accelerator with >= 16 GB (bf16 compute; shard with --mesh=DATAxMODEL on a slice).
Run time and perplexity have not been measured by the project yet: no accelerator was
available when this preset was written, so treat it as a starting point.
"""

from jpe.lab.train import TrainConfig
from jpe.nn.config import TransformerConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        model=TransformerConfig(d_model=768, num_layers=12, num_heads=12, dtype="bfloat16"),
        seq_len=512,
        batch_size=64,
        steps=20000,
        lr=1e-3,
        warmup=1000,
        checkpoint_every=1000,
        log_every=100,
    )
