"""Speech data: the embedded synthetic corpus, TFDS sources, tokenizers and the input pipeline."""
