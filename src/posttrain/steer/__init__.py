"""Steering at inference time: activation steering (vectors.py)."""
