"""Datasets: folder readers, TFDS builders, the frame-level training input, synthetic videos."""
