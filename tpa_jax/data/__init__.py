"""Speech data: the embedded synthetic corpus, TFDS sources, tokenizers, the input pipeline, and
the random task of tests and smoke runs."""
