"""Inference: CTC decoding, scoring (WER/CER, accuracy), evaluation of runs and exports,
encoding audio with a base, adapter exports and serving bundles."""
