"""The multi-task server's core: dynamic batching over a MultiTaskModel, metrics, and the HTTP
app (FastAPI; `launch/serve.py` runs it with uvicorn).

Requests wait in one queue. The batcher thread takes the oldest request's length bucket and
fills a batch with that bucket's waiting requests, in arrival order, up to the largest batch's
rows; it runs the batch when it is full or when its oldest request has waited `max_wait_ms`.
Batches mix tasks. A request's task names are resolved when its batch runs, under the model's
lock, so a task removed while its requests wait answers them with a clear error, never with
another task's output. A batch that fails answers its requests with the error, and the server
goes on.
"""


import asyncio
import base64
import binascii
import collections
import concurrent.futures
import dataclasses
import json
import logging
import threading
import time

import numpy as np

from tpa_jax.data import pcm
from tpa_jax.errors import SpecMismatchError, UserError
from tpa_jax.serve.multitask import (AudioLengthError, MultiTaskModel, SlotError,
                                     UnknownTaskError)

# Upper bounds of the batch-size histogram (rows).
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class RequestError(Exception):
  """A request the server refuses: an HTTP status and a message naming what is wrong."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


@dataclasses.dataclass(eq=False)  # requests are distinct even with equal fields
class _Request:
  audio: np.ndarray
  tasks: list[str]
  bucket: int
  arrived: float
  future: concurrent.futures.Future


class Metrics:
  """Counters and sums in Prometheus' text format."""

  def __init__(self):
    self.lock = threading.Lock()
    self.requests = collections.Counter()  # task -> requests
    self.errors = collections.Counter()  # (task, kind) -> errors
    self.batches = 0
    self.batch_rows = collections.Counter()  # histogram bucket -> batches
    self.rows = 0
    self.queue_seconds = 0.0
    self.queued = 0
    self.compute_seconds = 0.0

  def request(self, tasks, error: str | None = None) -> None:
    with self.lock:
      for t in tasks:
        self.requests[t] += 1
        if error:
          self.errors[(t, error)] += 1

  def batch(self, rows: int, queue_seconds: list[float], compute_seconds: float) -> None:
    with self.lock:
      self.batches += 1
      self.rows += rows
      self.batch_rows[next((b for b in _BATCH_BUCKETS if rows <= b), '+Inf')] += 1
      self.queue_seconds += sum(queue_seconds)
      self.queued += len(queue_seconds)
      self.compute_seconds += compute_seconds

  def text(self, compilations: int, waiting: int) -> str:
    with self.lock:
      out = ['# TYPE tpa_requests_total counter']
      out += [f'tpa_requests_total{{task="{t}"}} {n}' for t, n in sorted(self.requests.items())]
      out.append('# TYPE tpa_errors_total counter')
      out += [f'tpa_errors_total{{task="{t}",kind="{k}"}} {n}'
              for (t, k), n in sorted(self.errors.items())]
      out.append('# TYPE tpa_batch_rows histogram')
      cumulative = 0
      for b in (*_BATCH_BUCKETS, '+Inf'):
        cumulative += self.batch_rows.get(b, 0)
        out.append(f'tpa_batch_rows_bucket{{le="{b}"}} {cumulative}')
      out += [f'tpa_batch_rows_sum {self.rows}', f'tpa_batch_rows_count {self.batches}',
              '# TYPE tpa_queue_seconds summary',
              f'tpa_queue_seconds_sum {self.queue_seconds:.6f}',
              f'tpa_queue_seconds_count {self.queued}',
              '# TYPE tpa_compute_seconds summary',
              f'tpa_compute_seconds_sum {self.compute_seconds:.6f}',
              f'tpa_compute_seconds_count {self.batches}',
              '# TYPE tpa_compilations gauge', f'tpa_compilations {compilations}',
              '# TYPE tpa_waiting_requests gauge', f'tpa_waiting_requests {waiting}']
    return '\n'.join(out) + '\n'


class Batcher:
  """Dynamic batching of recognition requests over `model` (a thread; `close` stops it)."""

  def __init__(self, model: MultiTaskModel, *, max_wait_ms: float = 10.0):
    self.model, self.max_wait = model, max_wait_ms / 1000
    self.metrics = Metrics()
    self.queue: collections.deque[_Request] = collections.deque()
    self.cond = threading.Condition()
    self.running = True
    self.thread = threading.Thread(target=self._loop, name='batcher', daemon=True)
    self.thread.start()

  def submit(self, audio: np.ndarray, tasks: list[str]) -> concurrent.futures.Future:
    """Queues one utterance for `tasks`; the future gives its results (or raises)."""
    for name in tasks:
      self.model.task(name)  # unknown tasks are refused before they wait
    if len(tasks) > self.model.rows_per_batch():
      raise UserError(f'{len(tasks)} tasks on one utterance; at most '
                      f'{self.model.rows_per_batch()}')
    self.model.check_audio(audio)
    bucket = next(s for s in self.model.length_buckets if s >= len(audio))
    request = _Request(audio, list(tasks), bucket, time.monotonic(),
                       concurrent.futures.Future())
    with self.cond:
      if not self.running:
        raise RequestError(503, 'the server is shutting down')
      self.queue.append(request)
      self.cond.notify()
    return request.future

  def waiting(self) -> int:
    with self.cond:
      return len(self.queue)

  def close(self) -> None:
    """Stops the batcher; requests still waiting get an error."""
    with self.cond:
      self.running = False
      self.cond.notify()
      waiting, self.queue = list(self.queue), collections.deque()
    self.thread.join()
    for r in waiting:
      if r.future.set_running_or_notify_cancel():
        r.future.set_exception(RequestError(503, 'the server is shutting down'))

  def _take(self) -> list[_Request] | None:
    """The next batch, once it is full or its oldest request has waited max_wait."""
    limit = self.model.rows_per_batch()
    with self.cond:
      while self.running:
        if not self.queue:
          self.cond.wait()
          continue
        oldest = self.queue[0]
        batch, rows = [], 0
        for r in self.queue:
          if r.bucket == oldest.bucket and rows + len(r.tasks) <= limit:
            batch.append(r)
            rows += len(r.tasks)
        remaining = oldest.arrived + self.max_wait - time.monotonic()
        if rows >= limit or remaining <= 0:
          for r in batch:
            self.queue.remove(r)
          # A request whose client went away (its future cancelled) is dropped here; the
          # others can no longer be cancelled, so their results are always delivered.
          return [r for r in batch if r.future.set_running_or_notify_cancel()]
        self.cond.wait(timeout=remaining)
      return None

  def _loop(self) -> None:
    while True:
      batch = self._take()
      if batch is None:
        return
      try:
        self._run(batch)
      except Exception as e:  # pylint: disable=broad-except  (the batcher must keep serving)
        logging.exception('the batcher failed on a batch of %d requests', len(batch))
        for r in batch:
          if not r.future.done():
            r.future.set_exception(RequestError(500, f'{type(e).__name__}: {e}'))

  def _run(self, batch: list[_Request]) -> None:
    start = time.monotonic()
    with self.model.lock:  # no slot changes while the batch resolves and runs
      runnable = []
      for r in batch:
        gone = [t for t in r.tasks if t not in self.model.tasks]
        if gone:
          self.metrics.request(r.tasks, 'task_removed')
          r.future.set_exception(RequestError(
              404, f'task {gone[0]!r} was removed before this request ran; the tasks served '
              f'are {sorted(self.model.tasks)}'))
        else:
          runnable.append(r)
      if not runnable:
        return
      try:
        results = self.model.infer([r.audio for r in runnable], [r.tasks for r in runnable],
                                   locked=True)
      except Exception as e:  # pylint: disable=broad-except  (a failed batch must not kill us)
        logging.exception('a batch of %d requests failed', len(runnable))
        for r in runnable:
          self.metrics.request(r.tasks, 'batch_failed')
          r.future.set_exception(RequestError(500, f'the batch failed: {type(e).__name__}: {e}'))
        return
    compute = time.monotonic() - start
    self.metrics.batch(sum(len(r.tasks) for r in runnable),
                       [start - r.arrived for r in runnable], compute)
    for r, result in zip(runnable, results):
      self.metrics.request(r.tasks)
      r.future.set_result(result)


def decode_request(body: bytes, sample_rate_hz: int) -> tuple[np.ndarray, list[str]]:
  """(int16 samples, task names) of a /v1/recognize body; RequestError naming what is wrong."""
  try:
    payload = json.loads(body)
  except (ValueError, UnicodeDecodeError) as e:
    raise RequestError(400, f'the body is not JSON ({e}); send {{"task": NAME, "audio": '
                       'BASE64_OF_A_WAV_FILE}') from e
  if not isinstance(payload, dict):
    raise RequestError(400, 'the body must be a JSON object {"task": NAME, "audio": ...}')
  if ('task' in payload) == ('tasks' in payload):
    raise RequestError(400, 'give exactly one of "task" (a name) and "tasks" (a list of names)')
  tasks = [payload['task']] if 'task' in payload else payload['tasks']
  if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
    raise RequestError(400, '"tasks" must be a non-empty list of task names')
  if len(set(tasks)) != len(tasks):
    raise RequestError(400, f'"tasks" names a task twice: {tasks}')
  audio = payload.get('audio')
  if not isinstance(audio, str):
    raise RequestError(400, '"audio" must be a string: the base64 of a WAV file')
  try:
    data = base64.b64decode(audio, validate=True)
  except (binascii.Error, ValueError) as e:
    raise RequestError(400, f'"audio" is not valid base64 ({e})') from e
  try:
    return pcm.decode_wav(data, sample_rate_hz), tasks
  except pcm.AudioError as e:
    raise RequestError(400, f'"audio": {e}') from e


def create_app(model: MultiTaskModel, batcher: Batcher):
  """The FastAPI app of the server."""
  # Imported here: FastAPI is the `serve` extra; the batcher and request decoding need none.
  import fastapi  # pylint: disable=import-outside-toplevel
  from fastapi import responses  # pylint: disable=import-outside-toplevel

  app = fastapi.FastAPI(title='tpa_jax multi-task server')

  def error(status: int, message: str):
    return responses.JSONResponse({'error': message}, status_code=status)

  @app.post('/v1/recognize')
  async def recognize(request: fastapi.Request):
    body = await request.body()
    tasks: list[str] = []
    try:
      audio, tasks = decode_request(body, model.sample_rate_hz)
      try:
        future = batcher.submit(audio, tasks)
      except UnknownTaskError as e:
        raise RequestError(404, str(e)) from e
      except AudioLengthError as e:
        raise RequestError(413, str(e)) from e
      except UserError as e:
        raise RequestError(400, str(e)) from e
    except RequestError as e:  # refused before it waited: counted here
      batcher.metrics.request(tasks or ['-'], f'http_{e.status}')
      return error(e.status, str(e))
    try:
      results = await asyncio.wrap_future(future)
    except RequestError as e:  # answered by the batcher, which counted it
      return error(e.status, str(e))
    return {'results': results}

  # Handlers that take the model's lock are plain functions: FastAPI runs them in its thread
  # pool, so a batch holding the lock never stalls the event loop.
  @app.get('/v1/tasks')
  def list_tasks():
    with model.lock:
      return {'capacity': model.layout.capacity, 'layout': model.layout.describe(),
              'base_fingerprint': model.fingerprint,
              'tasks': [t.describe() for t in sorted(model.tasks.values(),
                                                     key=lambda t: t.slot)]}

  @app.post('/v1/tasks')
  async def add_task(request: fastapi.Request):
    try:
      payload = json.loads(await request.body())
      name, path = payload['name'], payload['path']
      if not isinstance(name, str) or not isinstance(path, str):
        raise TypeError(name)
    except (ValueError, KeyError, TypeError):
      return error(400, 'send {"name": NAME, "path": ADAPTER_EXPORT} (two strings)')
    try:
      task = await asyncio.get_running_loop().run_in_executor(None, model.add, name, path)
    except (SpecMismatchError, SlotError) as e:  # another base, no room, the name taken
      return error(409, str(e))
    except UserError as e:
      return error(400, str(e))
    return task.describe()

  @app.delete('/v1/tasks/{name}')
  async def remove_task(name: str):
    try:
      task = await asyncio.get_running_loop().run_in_executor(None, model.remove, name)
    except UnknownTaskError as e:
      return error(404, str(e))
    return {'removed': task.describe()}

  @app.get('/healthz')
  def healthz():
    with model.lock:
      tasks = sorted(model.tasks)
    return {'status': 'ok', 'tasks': tasks, 'compilations': model.compilations()}

  @app.get('/metrics')
  async def metrics():
    return responses.PlainTextResponse(batcher.metrics.text(model.compilations(),
                                                            batcher.waiting()))

  return app
