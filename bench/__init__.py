"""Benchmarks (each a `python -m bench.NAME` script; BENCHMARKS.md records what they measured)."""


def small_model():
    """The random `small` checkpoint's model in fp32, for the CPU benchmarks (built in a temporary directory)."""
    import tempfile
    from pathlib import Path

    import torch

    from models import load_model
    from models.checkpoint import make_checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        return load_model(make_checkpoint(Path(tmp) / "small", "small", "hf", "bf16", seed=0, overwrite=True),
                          dtype=torch.float32)

