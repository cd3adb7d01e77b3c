"""Task families: functions that sample ``Episode`` meta-batches."""

from metaflax.tasks.sinusoid import mse_loss_fn, sample_sinusoid

__all__ = ["mse_loss_fn", "sample_sinusoid"]
