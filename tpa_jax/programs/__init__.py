"""What the programs in launch/ share (flags, user errors, logs, multi-process set-up), and the
demo that `make demo` runs."""
