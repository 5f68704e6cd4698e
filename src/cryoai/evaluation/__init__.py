"""Evaluation: pose registration, errors, volume alignment, FSC, metrics and plots."""
