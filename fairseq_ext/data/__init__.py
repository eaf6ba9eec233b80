"""Data preparation: converters from external formats to the aligned text files fairseq-preprocess reads."""
