"""Self-supervised pre-training: BEST-RQ's random-projection quantizer, span masking and the
masked-prediction loss."""
