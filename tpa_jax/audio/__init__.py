"""Features on device: log-mel filterbanks, the front ends of imported encoders, SpecAugment,
and the featurizer that a config selects."""
