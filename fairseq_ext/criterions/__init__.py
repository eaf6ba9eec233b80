"""Criterions; each file registers one (imported explicitly by fairseq_ext/__init__.py)."""
