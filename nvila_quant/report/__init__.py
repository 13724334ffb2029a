"""Accuracy and speed reports of quantized NVILA checkpoints against their float reference."""
