"""Multimodal (image + text + label) datasets, partitioning and data-quality checks."""
