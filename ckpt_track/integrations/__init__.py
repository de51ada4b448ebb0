"""Integrations of ckpt_track with training frameworks (Lightning, Hugging Face Trainer)."""
