"""Particles as batches: a lazy dataset over the image stacks, the typed batch, epoch batching
and reading ahead of the step.
"""
