"""Scoring generated volumes against their targets: metrics, validation during training, and test.py's results."""
