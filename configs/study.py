"""The paper's study over one frozen base: methods x tasks x seeds, fairly compared.

  python launch/study.py --config=configs/study.py --workdir=runs/study           # default
  python launch/study.py --config=configs/study.py:quick --workdir=runs/study-quick
  python launch/study.py --config=configs/study.py:full --workdir=runs/study-full
  python launch/study.py --config=configs/study.py:scale --workdir=runs/study-scale
  python launch/study.py --config=configs/study.py:ssl --workdir=runs/study-ssl
  python launch/study.py --config=configs/study.py:best_rq --workdir=runs/study-best_rq
  python launch/study.py --config=configs/study.py:real --workdir=runs/study-real  # real speech
  python launch/study.py --config=configs/study.py:tiny --workdir=/tmp/study       # tests

The model, features, data and decoding are the demo's (configs/demo.py), so the default base is
the demo's pre-trained English base, reused from `study.base_workdir` when `make demo` has
cached it there. Lists are comma-separated and overridable like any field:
`--config.study.methods=head,tpa,lora --config.study.seeds=1`.
"""

import os

import ml_collections

from tpa_jax.config.files import load_config_file
from tpa_jax.config import ssl as pretrain

# The default comparison: the floor, the ceiling, TPA, the serial adapter at TPA's bottleneck
# and at twice it (TPA's trainable parameters), LoRA near TPA's parameters, TPA on the upper half.
CORE_METHODS = 'head,full,tpa,block_sequential,block_sequential_x2,lora,tpa_upper_half'
TASKS = ('synthetic_speech/target_lang,synthetic_speech/target_acoustic,'
         'synthetic_speech/lang_id')
VARIANTS = ('quick', 'full', 'scale', 'ssl', 'best_rq', 'real', 'tiny', 'ssl_tiny')
# The real-speech task: the manifest `make real-data` writes (launch/manifest.py --layout=asterisk:
# Debian's Asterisk prompts, one speaker, 8 kHz telephone audio resampled to 16 kHz).
REAL_DATA = 'runs/real_data/asterisk'


def _demo_config(arg=None):
  demo = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'demo.py')
  return load_config_file(demo + (f':{arg}' if arg else ''))


def study_fields(num_blocks: int) -> ml_collections.ConfigDict:
  s = ml_collections.ConfigDict()
  # Tasks: dataset names (synthetic_speech/<domain of data.domains_file>, librispeech), each
  # optionally ':ctc' or ':classification' (default: language ID for a domain of several
  # languages, ASR otherwise).
  s.tasks = TASKS
  # Methods (rows): head, full, tpa, ff_sequential, block_parallel, block_sequential,
  # block_sequential_x2, mhsa_parallel, conv_parallel, lora, tpa_upper_half, tpa_upper_quarter,
  # tpa_lower_half, tpa_top<k>, tpa_r<r>.
  s.methods = CORE_METHODS
  # Number of seeds (0 .. seeds-1): each varies the adapter/head initialisation and data order.
  s.seeds = 3
  # Learning-rate grid: every method and task trains its first seed at each; the rate with the
  # best validation score is chosen for that method and task. Measured over 1e-3 .. 3e-2
  # (README): full fine-tuning's 3e-3 and TPA's, the serial adapters' and LoRA's 1e-2 are
  # interior optima; the head and TPA on the upper half chose 3e-2. Two rates keep the default
  # study within its time; `--config.study.learning_rates=1e-3,3e-3,1e-2,3e-2` widens it.
  s.learning_rates = '3e-3,1e-2'
  # Which task's validation chooses each method's rate: 'first' (the first task's, used for
  # every task: a grid run per rate and method) or 'each' (every task its own: a grid run per
  # rate, method and task).
  s.rate_selection = 'first'
  # Budget of every run: steps, warmup (then cosine decay to 0), validation every this many
  # steps (the best step is kept and scored on test). A validation pass costs about 40 steps.
  s.num_steps = 250
  s.warmup_steps = 50
  s.eval_every_steps = 125
  # TPA's bottleneck (and the adapters' of the other placements).
  s.bottleneck = 32
  # LoRA's rank and alpha (updates scaled by alpha / rank). Rank 5 on q, k, v, out and both
  # FFNs of 6 x 144 blocks trains 120,960 weights, TPA at r=32 116,160.
  s.lora_rank = 5
  s.lora_alpha = 10.0
  # TPA runs of the first this many seeds are also scored with their adapters removed from the
  # lowest (and from the highest) k blocks, k = 0 .. num_blocks, without retraining: 2 x 6
  # test passes of the lexicon decoder per ASR run at the demo's size.
  s.pruning_seeds = 1
  # Where `make demo` cached its base and corpus (reused when they fit this config).
  s.base_workdir = 'runs/demo'
  # scale: model shapes of the bases compared ('' : this config's model only).
  s.scale_models = ''
  # The frozen base: 'supervised' (the demo's base, pre-trained with CTC on `source`),
  # 'best_rq' (pre-trained with BEST-RQ on the audio of `source`, the config's ssl and
  # ssl_pretrain sections; cached in <base_workdir or workdir>/best_rq) or 'random' (the same
  # architecture at its random initialisation) or 'best_rq_keepK' (the BEST-RQ base's frontend
  # and lowest K blocks under the random base's blocks above them). base.path, when given,
  # overrides it.
  s.base = 'supervised'
  # ssl: the bases compared, each a study of its own in <workdir>/<base> ('' : study.base only).
  s.bases = ''
  # Processes that run cells side by side (each a share of the task x method pairs). One
  # process keeps about one core busy at this model size: 2 on a 2-core machine.
  s.workers = 2
  # JAX's persistent compilation cache ('': <workdir>/jax_cache): identical programs of
  # different cells (and processes) compile once.
  s.compile_cache = ''
  del num_blocks
  return s


def get_config(arg=None):
  if arg not in (None, '') and arg not in VARIANTS:
    raise ValueError(f'configs/study.py takes no argument or one of {VARIANTS}, got {arg!r}')
  tiny = arg in ('tiny', 'ssl_tiny')
  c = _demo_config('tiny' if tiny else None)
  c.study = s = study_fields(c.model.num_blocks)
  # Validation is scored with best-path decoding (cheap); test with the lexicon decoder.
  c.train.validation_decoding = 'greedy'
  c.checkpoint.async_save = False
  if arg == 'quick':  # a first look: one seed, one ASR task and language ID, one rate
    s.tasks = 'synthetic_speech/target_lang,synthetic_speech/lang_id'
    # The floor, the ceiling, TPA, the serial adapter and LoRA at TPA's parameters: the
    # comparisons of claims (a), (b) and (d). All seven core methods take 18.5 minutes.
    s.methods = 'head,full,tpa,block_sequential_x2,lora'
    s.seeds = 1
    s.pruning_seeds = 0  # no pruning curve: it costs 12 test passes (3 min)
    s.learning_rates = '3e-3'
  elif arg == 'full':  # everything: every placement, pruning depth and bottleneck
    n = c.model.num_blocks
    s.methods = ','.join([CORE_METHODS, 'ff_sequential', 'block_parallel', 'mhsa_parallel',
                          'conv_parallel', 'tpa_upper_quarter', 'tpa_lower_half',
                          *[f'tpa_top{k}' for k in range(1, n)],
                          *[f'tpa_r{r}' for r in (4, 8, 16, 64)]])
  elif arg == 'scale':  # head, full and TPA over bases of three sizes, on Spanish ASR
    s.tasks = 'synthetic_speech/target_lang'
    s.methods = 'head,full,tpa'
    s.seeds = 1  # more with --config.study.seeds=N: a re-run trains only the new cells
    s.pruning_seeds = 0
    s.scale_models = 'demo,wide,wider'
  elif arg in ('ssl', 'best_rq'):
    # The paper's setting: a self-supervised base. ssl: TPA over the BEST-RQ base, the same
    # architecture left random, and the supervised base; best_rq: the default comparison over
    # the BEST-RQ base.
    pretrain.demo_fields(c)
    if arg == 'ssl':
      s.methods = 'tpa'
      s.bases = 'best_rq,random,supervised'
      s.pruning_seeds = 0
      s.seeds = 2
      # Each base may want its own rate (a random base most of all): the wide grid, which
      # with rate_selection='first' adds only runs on the first task.
      s.learning_rates = '1e-3,3e-3,1e-2,3e-2'
    else:
      s.base = 'best_rq'
  elif arg == 'real':  # the demo's base (synthetic English) adapted to recorded English
    s.tasks = f'manifest:{REAL_DATA}'
    s.methods = 'head,tpa,lora,full'
    s.seeds = 1
    s.pruning_seeds = 0
    # The default grid (full fine-tuning's optimum and the adapters'), and twice the synthetic
    # tasks' budget: recorded speech is farther from the base (measured at 250 steps and 3e-3
    # alone: every method but full at 100% WER, character error rates still falling).
    s.num_steps = 500
    s.eval_every_steps = 250
    # References and training text alike: lower case, punctuation removed (the prompts are
    # written sentences: "Please enter your password, followed by the pound key.").
    c.data.text_normalization = 'lower_no_punctuation'
  if tiny:  # seconds: the tiny corpus and model
    s.tasks = 'synthetic_speech/target_lang_tiny,synthetic_speech/lang_id_tiny'
    s.methods = 'head,tpa,lora'
    s.seeds = 1
    s.pruning_seeds = 1
    s.learning_rates = '3e-3'
    s.num_steps = 12
    s.warmup_steps = 2
    s.eval_every_steps = 3
    s.bottleneck = 8
    s.lora_rank = 2
    s.lora_alpha = 4.0
    s.base_workdir = ''
    s.workers = 1
    if arg == 'ssl_tiny':
      pretrain.demo_fields(c)
      pretrain.tiny_fields(c)
      s.tasks = 'synthetic_speech/target_lang_tiny'
      s.methods = 'tpa'
      s.bases = 'best_rq,random,supervised'
      s.pruning_seeds = 0
  return c
