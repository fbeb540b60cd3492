"""Evaluation: CTC decoding (best path, the lexicon decoder), scoring (WER/CER, accuracy) and the
evaluation of a run, an adapter export or a base (`launch/evaluate.py`)."""
