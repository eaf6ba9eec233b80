"""Model architectures (fairseq imports this folder of a user dir automatically)."""
