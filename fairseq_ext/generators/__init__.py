"""Sequence generators."""
