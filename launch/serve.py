"""Serve many tasks from one frozen encoder over HTTP, with dynamic batching.

Usage:
  python launch/serve.py --config=configs/demo.py --config.base.path=runs/demo/base/encoder \
      --adapters=es=runs/es/adapters.safetensors,lang=runs/lang/adapters.safetensors \
      --port=8080 --capacity=16 --max_wait_ms=10

The frozen encoder is sharded over this host's devices by the training rules (--mesh); the
bank holds --capacity tasks with the layout of the tasks given and of --reserve (exports whose
kinds may be added later). Every (rows, samples) shape is compiled at start-up and logged;
requests never compile. Endpoints: POST /v1/recognize, GET|POST /v1/tasks,
DELETE /v1/tasks/NAME, GET /healthz, GET /metrics (README: "Serving many tasks").
"""

import logging

from absl import flags
from ml_collections import config_flags

from tpa_jax import sharding
from tpa_jax.serve import multitask, server
from tpa_jax.programs import cli

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config of the base (path[:arg]).',
                                          lock_config=True)
_ADAPTERS = flags.DEFINE_string('adapters', '', 'Tasks at start: NAME=FILE[,NAME=FILE...].')
_RESERVE = flags.DEFINE_list('reserve', [], 'Adapter exports whose placements, bottlenecks and '
                             'heads the bank must also hold (tasks added later).')
_CAPACITY = flags.DEFINE_integer('capacity', 16, 'Task slots of the bank.')
_HOST = flags.DEFINE_string('host', '127.0.0.1', 'Address to listen on.')
_PORT = flags.DEFINE_integer('port', 8080, 'Port to listen on.')
_MAX_WAIT = flags.DEFINE_float('max_wait_ms', 10.0, 'Longest a request waits for its batch to '
                               'fill.')
_BATCH_SIZES = flags.DEFINE_list('batch_sizes', ['1', '8', '32'], 'Rows (utterance x task) of '
                                 'the compiled batch shapes.')
_SELECT = flags.DEFINE_enum('select', 'gather', ['gather', 'onehot'],
                            'How each row reads its adapters from the bank.')
_DECODING = flags.DEFINE_enum(
    'decoding', 'best_path', list(multitask.DECODINGS),
    "CTC text: 'best_path', or 'lexicon' (the lexicon decoder an adapter export carries when "
    'its run decoded with one; slower, on the host).')
_MESH = flags.DEFINE_string('mesh', '', 'Mesh axis sizes (data=..,fsdp=..,tensor=..). Default: '
                            'the config\'s mesh if it fits, else every device on the data axis.')
flags.mark_flags_as_required(['config'])


def main(argv):
  cli.start(argv)
  config = _CONFIG.value
  cli.require_base(config)
  tasks = multitask.parse_adapters(_ADAPTERS.value) if _ADAPTERS.value else {}
  mesh = sharding.program_mesh(config.mesh, _MESH.value)
  model = multitask.MultiTaskModel(
      config, mesh, tasks=tasks, capacity=_CAPACITY.value, reserve=_RESERVE.value,
      batch_sizes=[int(b) for b in _BATCH_SIZES.value], select=_SELECT.value,
      decoding_kind=_DECODING.value)
  model.warmup()
  batcher = server.Batcher(model, max_wait_ms=_MAX_WAIT.value)
  import uvicorn  # pylint: disable=import-outside-toplevel
  logging.info('serving %s on http://%s:%d (mesh %s)', sorted(model.tasks), _HOST.value,
               _PORT.value, dict(mesh.shape))
  try:
    uvicorn.run(server.create_app(model, batcher), host=_HOST.value, port=_PORT.value,
                log_level='warning')
  finally:
    batcher.close()


if __name__ == '__main__':
  cli.run(main)
