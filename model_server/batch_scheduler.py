"""Server-side batching: concurrent Predict calls on one signature run as one batch.

Modelled on TF Serving's BatchingSession over a BasicBatchScheduler
(tensorflow_serving/batching/batching_session.cc, tensorflow/core/kernels/
batching_util/basic_batch_scheduler.h), with its parameters and defaults:

- calls on the same (model, version, signature) queue together; a batch closes
  when it holds `max_batch_size` rows or `batch_timeout_micros` after its first
  call arrived; up to `num_batch_threads` batches of a queue run at once;
- the inputs are concatenated along dimension 0, padded up to the next
  `allowed_batch_sizes` entry by repeating the first row, run once, and every
  output is split back by rows;
- more than `max_enqueued_batches` batches waiting -> UNAVAILABLE; one call with
  more rows than `max_batch_size` -> INVALID_ARGUMENT (run alone instead when
  `enable_large_batch_splitting` is set);
- unlike TF Serving, one caller's bad input never fails the others: when a
  merged batch fails with INVALID_ARGUMENT (e.g. one undecodable image, or
  one over the in-graph pixel bound), it is split in halves and each half run
  again, down to single calls, so only the calls whose input is at fault get
  the error (a batch of n calls with one bad one costs about 2 log2(n) extra
  runs, all smaller); any other error fails every call of the batch.

Each batch's size (rows before padding) goes to the histogram
carrecog_model_server_batch_size{model} (common.metrics).

Not implemented: padding of variable-length inputs (pad_variable_length_inputs).
"""
from __future__ import annotations

import os
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Hashable, Mapping

import tensorflow as tf
from google.protobuf import message

from common.metrics import observe_batch_size
from model_server.errors import InvalidArgument, Unavailable

Function = Callable[..., Mapping[str, tf.Tensor]]


@dataclass
class _Task:
    feeds: dict[str, tf.Tensor]
    size: int
    enqueued: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)


@dataclass
class _Queue:
    function: Function
    tasks: deque = field(default_factory=deque)
    rows: int = 0  # rows waiting in `tasks`
    runners: int = 0  # batches of this queue being formed or run
    ready: threading.Condition = field(default_factory=threading.Condition)
    model: str = ""  # the metrics label


def task_size(feeds: Mapping[str, tf.Tensor]) -> int:
    """Rows in one call: dimension 0, which every input must have and share."""
    sizes = set()
    for tensor in feeds.values():
        if tensor.shape.rank == 0:
            raise InvalidArgument("Batching Run() input tensors must have at least one dimension")
        sizes.add(int(tensor.shape[0]))
    if len(sizes) > 1:
        raise InvalidArgument("Batching Run() input tensors must have equal 0th-dimension size")
    return sizes.pop() if sizes else 0


class BatchScheduler:
    """Merges concurrent calls of the same signature; `run` blocks its caller's thread."""

    def __init__(self, params: message.Message) -> None:
        def value(name: str, default: int) -> int:
            return getattr(params, name).value if params.HasField(name) else default

        self.max_batch_size = value("max_batch_size", 1000)
        self.timeout_s = value("batch_timeout_micros", 0) / 1e6
        self.max_enqueued_batches = value("max_enqueued_batches", 10)
        self.num_batch_threads = value("num_batch_threads", os.cpu_count() or 1)
        self.allowed_batch_sizes = list(params.allowed_batch_sizes)
        self.split_large_tasks = (params.enable_large_batch_splitting.value
                                  if params.HasField("enable_large_batch_splitting") else False)
        self._queues: dict[Hashable, _Queue] = {}
        self._lock = threading.Lock()

    def run(self, key: Hashable, function: Function, feeds: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """This call's outputs, computed in a batch with other calls on `key`."""
        size = task_size(feeds)
        if size == 0 or (size > self.max_batch_size and self.split_large_tasks):
            return dict(function(**feeds))  # nothing to merge, or too large to merge: run alone
        if size > self.max_batch_size:
            raise InvalidArgument(f"Task size {size} is larger than maximum input batch size {self.max_batch_size}")
        with self._lock:
            queue = self._queues.setdefault(key, _Queue(function, model=str(key[0] if isinstance(key, tuple) else key)))
        task = _Task(feeds, size)
        with queue.ready:
            if queue.rows + size > self.max_batch_size * self.max_enqueued_batches:
                raise Unavailable("The batch scheduling queue to which this task was submitted is full")
            queue.tasks.append(task)
            queue.rows += size
            queue.ready.notify_all()
            start_runner = queue.runners < self.num_batch_threads
            if start_runner:
                queue.runners += 1
        if start_runner:  # a runner lives while its queue has work; daemon: never holds up exit
            threading.Thread(target=self._drain, args=(queue,), name=f"batch-{key}", daemon=True).start()
        return task.future.result()

    def _drain(self, queue: _Queue) -> None:
        """Form and run batches of one queue until it is empty."""
        while True:
            with queue.ready:
                if not queue.tasks:
                    queue.runners -= 1
                    return
                closes_at = queue.tasks[0].enqueued + self.timeout_s
                while queue.tasks and queue.rows < self.max_batch_size and time.monotonic() < closes_at:
                    queue.ready.wait(closes_at - time.monotonic())
                batch, rows = [], 0
                while queue.tasks and rows + queue.tasks[0].size <= self.max_batch_size:
                    task = queue.tasks.popleft()
                    batch.append(task)
                    rows += task.size
                queue.rows -= rows
            if batch:
                observe_batch_size(queue.model, rows)
                self._run(queue.function, batch, rows)

    def _padded(self, rows: int) -> int:
        return next((size for size in self.allowed_batch_sizes if size >= rows), rows)

    def _run(self, function: Function, batch: list[_Task], rows: int) -> None:
        try:
            outputs = self._run_merged(function, batch, rows)
        except tf.errors.InvalidArgumentError as exc:
            if len(batch) == 1:
                batch[0].future.set_exception(exc)
                return
            # Some call's input is at fault, not the batch: find it by halves, so the others get answers.
            half = len(batch) // 2
            for part in (batch[:half], batch[half:]):
                self._run(function, part, sum(task.size for task in part))
            return
        except BaseException as exc:  # every call of a failed batch gets its error, as in TF Serving
            for task in batch:
                if not task.future.done():
                    task.future.set_exception(exc)
            return
        offset = 0
        for task in batch:
            task.future.set_result({alias: tensor[offset:offset + task.size] for alias, tensor in outputs.items()})
            offset += task.size

    def _run_merged(self, function: Function, batch: list[_Task], rows: int) -> Mapping[str, tf.Tensor]:
        """The outputs of `function` on the batch's inputs, merged and padded."""
        feeds = {}
        for alias in batch[0].feeds:
            parts = [task.feeds[alias] for task in batch]
            if len({tuple(part.shape[1:]) for part in parts}) > 1:
                raise InvalidArgument(
                    f"Tensors with name '{alias}' from different tasks have different shapes and padding is "
                    "turned off. Set pad_variable_length_inputs to true, or ensure that all tensors with the "
                    "same name have equal dimensions starting with the first dim.")
            merged = tf.concat(parts, axis=0) if len(parts) > 1 else parts[0]
            padding = self._padded(rows) - rows
            if padding:
                merged = tf.concat([merged, tf.repeat(merged[:1], padding, axis=0)], axis=0)
            feeds[alias] = merged
        outputs = function(**feeds)
        for alias, tensor in outputs.items():
            if tensor.shape.rank == 0 or tensor.shape[0] != self._padded(rows):
                raise InvalidArgument(f"Batched output tensor '{alias}' has 0th dimension "
                                      f"{tensor.shape[0] if tensor.shape.rank else 'none'}, not the batch "
                                      f"size {self._padded(rows)}; this signature cannot be batched")
        return outputs
