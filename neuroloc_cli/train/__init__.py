"""Masked continual pretraining: train only what a mask allows, keep the rest bit-for-bit."""
