"""The paper's study: cells (task x method x seed runs), fair learning-rate choice on validation,
test once at the best validation step, the pruning curve, tables and plots (`launch/study.py`)."""
