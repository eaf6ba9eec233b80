"""fairseq scorers (``fairseq-generate --scoring NAME``); each file registers one, imported explicitly
by fairseq_ext/__init__.py."""
