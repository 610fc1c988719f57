"""Checkpoints: Megatron-LM's on-disk format, training checkpoints, and conversion from and to Hugging Face folders."""
