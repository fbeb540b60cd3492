"""Configs: every field with its default (`fields`), named presets and methods (`presets`), and
loading config files with overrides (`files`). `configs/*.py` compose these."""

from tpa_jax.config.fields import base_config
from tpa_jax.config.files import check_overrides, load_config_file, parse_arg
from tpa_jax.config.presets import (ADAPT_KEYS, DATA_NAMES, DOMAINS_FILE, METHODS, MODEL_PRESETS,
                                    TINY_DOMAINS_FILE, adapt_config, apply_data, apply_method,
                                    synthetic_domains)
