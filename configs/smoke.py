"""A few steps of a 2-layer model: checks that a set-up runs end to end (used by the tests).

    python train/lm.py --config=smoke --pe=alibi --workdir=/tmp/smoke

Hardware: any CPU; under a minute. Perplexity is meaningless at this budget.
"""

from jpe.lab.train import TrainConfig
from jpe.nn.config import TransformerConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        model=TransformerConfig(d_model=32, num_layers=2, num_heads=2),
        seq_len=32,
        batch_size=8,
        steps=6,
        lr=1e-3,
        warmup=2,
        checkpoint_every=3,
        log_every=1,
        eval_tokens=256,
    )
