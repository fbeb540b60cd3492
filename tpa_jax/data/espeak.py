"""Speech synthesis with eSpeak NG through ctypes (the `speech` extra: `pip install tpa_jax[speech]`).

eSpeak NG is GPL-licensed; it is loaded at run time from the `espeakng-loader` wheel, which ships
the shared library and its voice data, and is used only here. Nothing is downloaded.
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_RATE, _PITCH, _RANGE = 1, 3, 4  # espeak_PARAMETER values
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                             ctypes.c_void_p)


class Espeak:
  """One process-wide eSpeak NG engine (the library keeps global state); thread-safe.

  `synthesize` returns int16 audio at `sample_rate` (22050 Hz, eSpeak's native rate).
  """

  _instance: 'Espeak | None' = None
  _create_lock = threading.Lock()

  def __init__(self):
    try:
      import espeakng_loader  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError('speech synthesis needs eSpeak NG: pip install "tpa_jax[speech]" '
                        '(espeakng-loader)') from e
    self._lib = ctypes.CDLL(espeakng_loader.get_library_path())
    self._lib.espeak_Initialize.restype = ctypes.c_int
    self._lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p,
                                            ctypes.c_int]
    self._lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    self._lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    self._lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint,
                                       ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
                                       ctypes.c_void_p, ctypes.c_void_p]
    rate = self._lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0,
                                       espeakng_loader.get_data_path().encode(), 0)
    if rate <= 0:
      raise RuntimeError(f'eSpeak NG failed to initialise (returned {rate})')
    self.sample_rate = rate
    self._chunks: list[np.ndarray] = []
    self._callback = _CALLBACK(self._collect)  # keep a reference: C holds the pointer
    self._lib.espeak_SetSynthCallback(self._callback)
    self._lock = threading.Lock()

  @classmethod
  def get(cls) -> 'Espeak':
    with cls._create_lock:
      if cls._instance is None:
        cls._instance = cls()
      return cls._instance

  def _collect(self, wav, n, events):
    del events
    if n > 0:
      self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
    return 0

  def synthesize(self, text: str, *, voice: str, rate_wpm: int = 175, pitch: int = 50,
                 pitch_range: int = 50) -> np.ndarray:
    """int16 audio of `text` spoken by `voice` (e.g. 'en-us+m3', 'es+f2') at `sample_rate`."""
    with self._lock:
      if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
        raise ValueError(f'eSpeak NG has no voice {voice!r} (a language code such as en-us, '
                         "optionally +variant such as '+m3', '+f2', '+klatt')")
      self._lib.espeak_SetParameter(_RATE, int(rate_wpm), 0)
      self._lib.espeak_SetParameter(_PITCH, int(pitch), 0)
      self._lib.espeak_SetParameter(_RANGE, int(pitch_range), 0)
      self._chunks = []
      data = text.encode('utf-8') + b'\0'
      err = self._lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None,
                                   None)
      if err != 0:
        raise RuntimeError(f'eSpeak NG failed on {text!r} (error {err})')
      self._lib.espeak_Synchronize()
      chunks, self._chunks = self._chunks, []
    return np.concatenate(chunks) if chunks else np.zeros((0,), np.int16)
