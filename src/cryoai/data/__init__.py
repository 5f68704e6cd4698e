"""Datasets and transforms: lazy particle stacks, normalisation, masks."""
