"""Helpers for tests, the demo, benchmarks and recipe smoke runs: synthetic data, in-process
fairseq CLI calls, tiny models.  Not imported by the plugin itself."""
