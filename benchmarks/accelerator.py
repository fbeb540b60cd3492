"""Everything the accelerator issues need measured, in one run of at most --budget_s seconds.

Usage:
  python benchmarks/accelerator.py                  # one H100 / H200 / TPU host: about 8 minutes
  python benchmarks/accelerator.py --preset=tiny    # the same code path on CPU: 4-7 min, 2 cores

Runs, in priority order, each as its own process (an out-of-memory or a kernel that fails to
lower ends that part with an `error` line, not the run) with the time left to it:
  1. benchmarks/train_step.py at the preset's model (600m) for tpa, full and tpa_upper_half, each
     with every attention implementation of --impls (bf16, 8 x 30 s of audio per device), and,
     where OUT is set, a jax.profiler trace of one TPA step per implementation in $OUT/trace;
  2. benchmarks/attention.py: the attention alone, forward + backward, at T = 1,500 frames;
  3. benchmarks/serving.py on the device (mixed-task batches, shared prefix, the server).
Every JSON line the parts print is printed here and written to $OUT/accelerator.jsonl when OUT is
set, as it arrives, so a run cut short keeps what it measured. No network is needed: the model
weights are random (speed does not depend on them) and the audio is generated.

On a TPU VM: copy the checkout, `pip install -e '.[test,speech,serve]' 'jax[tpu]'` and run the
same command on one host (`--peak_tflops` is looked up from the device kind: v5e 197, v5p 459).
"""

import argparse
import json
import os
import subprocess
import sys
import time

# (script, arguments, seconds it may take at most), per preset.
# `trace`: the train step's profiler argument for the TPA part ([] where OUT is not set).
PLANS = {
    'device': lambda impls, trace: [
        *[('train_step.py', ['--preset=600m', f'--methods={m}', f'--attention_impls={impls}',
                             '--per_device_batch=8', '--seconds=30', '--steps=5',
                             *(trace if m == 'tpa' else [])], 150)
          for m in ('tpa', 'full', 'tpa_upper_half')],
        ('attention.py', ['--preset=600m', '--frames=1500', '--batch=8', f'--impls={impls}'], 60),
        ('serving.py', ['--model=demo', '--repeats=3'], 120),
    ],
    # One process for the three methods: the smoke run's time is mostly start-up and compiling
    # (about 25 s per method and implementation on 2 cores). TPA runs every implementation
    # (forward and backward through the attention); full runs the reference and
    # tpa_upper_half the Pallas kernel (forward only in its frozen lower half).
    'tiny': lambda impls, trace: [
        ('train_step.py', ['--preset=tiny',
                           '--methods=tpa,full:xla,tpa_upper_half:pallas',
                           f'--attention_impls={impls}', '--per_device_batch=1', '--seconds=2',
                           '--steps=1', *trace], 480),
        ('attention.py', ['--preset=tiny', '--frames=100', '--batch=2', f'--impls={impls}',
                          '--block=32', '--steps=1'], 240),
        ('serving.py', ['--model=tiny', '--requests=1', '--repeats=1', '--no_server'], 480),
    ],
}


def run_part(script: str, args: list[str], timeout_s: float, emit) -> None:
  """Runs one benchmark, passing on its JSON lines; a failure or timeout becomes an error line."""
  here = os.path.dirname(os.path.abspath(__file__))
  cmd = [sys.executable, os.path.join(here, script), *args]
  start = time.perf_counter()
  with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                        cwd=os.path.dirname(here)) as proc:
    try:
      out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
      proc.kill()
      out, err = proc.communicate()
      err = f'timed out after {timeout_s:.0f} s\n{err}'
  for line in out.splitlines():
    if line.startswith('{'):
      emit(json.loads(line))
  if proc.returncode:
    emit({'part': script, 'args': args, 'error': err.strip().splitlines()[-20:],
          'returncode': proc.returncode})
  emit({'part': script, 'args': args, 'seconds': round(time.perf_counter() - start, 1)})


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--preset', default='device', choices=sorted(PLANS))
  parser.add_argument('--impls', default='xla,chunked,cudnn,pallas',
                      help='attention implementations to measure (xla first: the reference)')
  parser.add_argument('--budget_s', type=float, default=0.0,
                      help='the whole run at most (0: 480 s on a device; 1,200 s for the tiny '
                           'preset, whose compiles on a slow 2-core CPU take minutes)')
  args = parser.parse_args()
  out_dir = os.environ.get('OUT')
  out_path = os.path.join(out_dir, 'accelerator.jsonl') if out_dir else None

  def emit(record: dict) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if out_path:
      with open(out_path, 'a') as f:
        f.write(line + '\n')

  budget_s = args.budget_s or (1200.0 if args.preset == 'tiny' else 480.0)
  deadline = time.perf_counter() + budget_s
  trace = [f'--trace_dir={os.path.join(out_dir, "trace")}'] if out_dir else []
  for script, part_args, limit_s in PLANS[args.preset](args.impls, trace):
    left = deadline - time.perf_counter()
    if left < 10:
      emit({'part': script, 'args': part_args, 'error': 'skipped: the run budget is spent'})
      continue
    run_part(script, part_args, min(limit_s, left), emit)


if __name__ == '__main__':
  main()
