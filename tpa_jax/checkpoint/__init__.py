"""Checkpoints: bases (frozen encoders, replaced safely, restored straight into shards), run
checkpoints (trainable state, optimizer, data position, run record), base fingerprints and the
adapter spec every trained adapter carries."""

from tpa_jax.checkpoint.base import (load_base, read_metadata, recover, restore_state, save_state,
                                     stored_dtypes)
from tpa_jax.checkpoint.fingerprint import base_fingerprint, base_state, weights_digest
from tpa_jax.checkpoint.run import (RunCheckpointer, check_run, check_workdir, run_info,
                                    saved_spec)
from tpa_jax.checkpoint.trees import abstract, from_nested, to_nested
from tpa_jax.errors import CheckpointError, SpecMismatchError
