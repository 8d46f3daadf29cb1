"""The thread that owns the model, and the queue other threads reach it through.

Every model forward and every change to the model (adapter loads, evictions, merges) happens on
this one thread, so nothing needs to be thread-safe inside torch or peftkit. Other threads call
:meth:`Worker.submit` (a request) and :meth:`Worker.call` (any function, run between two steps;
its result comes back in a ``Future``); requests answer through their own ``emit`` callback.
Subclasses implement :meth:`Worker.work` (one step over ``self.waiting``) and :meth:`Worker.busy`.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.errors import AdapterNotFoundError, ConfigError, PeftkitError
from .adapters import AdapterTable
from .fastpath import MergedPath
from .metrics import Metrics
from .prepack import Prepacked
from .prepack import available as prepack_available

log = logging.getLogger("peftkit.serve")


@dataclass
class Failed:
    """A request could not be served: an HTTP status, a message, and the request field to blame."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None  # the OpenAI error ``code`` (``model_not_found``)


class QueueFull(PeftkitError):
    """More requests are waiting than the engine accepts (``max_waiting``)."""


class Worker:
    """An engine thread over ``model`` and the adapters of ``table``."""

    name = "peftkit-engine"

    def __init__(self, model: nn.Module, tokenizer: Any, table: AdapterTable, max_batch: int = 16,
                 max_waiting: int = 1024, metrics: Metrics | None = None, prepack: bool = False) -> None:
        if max_batch < 1:
            raise ConfigError(f"max_batch must be at least 1, got {max_batch}")
        if max_waiting < 1:
            raise ConfigError(f"max_waiting must be at least 1, got {max_waiting}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.table = table
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.metrics = metrics or Metrics()
        self.device = next(model.parameters()).device
        self.merged = MergedPath(model)
        #: oneDNN-blocked copies of the frozen linear weights (CPU; peftkit.serve.prepack), refreshed whenever an
        #: adapter load, eviction or the merged path changes weights
        self.prepacked: Prepacked | None = None
        if prepack and self.device.type == "cpu" and prepack_available():
            self.prepacked = Prepacked(model)
            self.prepacked.sync()
            table.changed = self.merged.changed = self.prepacked.sync
        self.inbox: queue.Queue = queue.Queue()
        self.waiting: list[Any] = []
        self.running: list[Any] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._pending = 0  # requests in the inbox or waiting
        self._count = threading.Lock()

    # -- other threads ------------------------------------------------------------------------
    def start(self) -> Worker:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()
        return self

    def claim_thread(self) -> None:
        """Make the calling thread the engine thread; it then calls :meth:`run_here` (``start`` does nothing).

        Why: once one thread of a process has run OpenMP work (loading a model does), the OpenMP
        workers of any other thread wait passively between parallel regions (more managed threads
        than cores), which made every forward of an engine thread started later about 30% slower on
        a 2-core machine. ``peftkit serve`` loads the model on the thread that then runs the engine."""
        self._stop.clear()
        self._thread = threading.current_thread()

    def run_here(self) -> None:
        """The engine loop in the calling thread (claimed with :meth:`claim_thread`), until :meth:`stop`."""
        self._loop()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.inbox.put(None)
        if self._thread is not None:
            if self._thread is not threading.current_thread():
                self._thread.join(timeout)
            self._thread = None
        if self.prepacked is not None:  # the model gets its own forwards back
            self.table.changed = self.merged.changed = None
            self.prepacked.close()
            self.prepacked = None

    def submit(self, request: Any) -> Any:
        with self._count:
            if self._pending >= self.max_waiting:
                raise QueueFull(f"{self._pending} requests are already waiting (max {self.max_waiting}); retry later")
            self._pending += 1
        self.inbox.put(request)
        return request

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the engine thread between steps (adapter loads and unloads); its result in a Future."""
        fut: Future = Future()
        self.inbox.put((fn, fut))
        return fut

    @property
    def queue_length(self) -> int:
        return self._pending

    @property
    def running_rows(self) -> int:
        return len(self.running)

    # -- engine thread ------------------------------------------------------------------------
    def busy(self) -> set[str]:
        """Adapters that running requests hold (never evicted)."""
        return {r.adapter for r in self.running if r.adapter is not None}

    def work(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            self._drain(block=not self.running and not self.waiting)
            if self._stop.is_set():
                break
            try:
                self.work()
            except Exception as e:  # a bug or an out-of-memory: fail the batch, keep serving
                log.exception("engine step failed")
                self.fail_all(e)
        self.fail_all(RuntimeError("the server is shutting down"), status=503)

    def _drain(self, block: bool) -> None:
        try:
            item = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if isinstance(item, tuple):
                fn, fut = item
                self.merged.release()  # loads and deletes change the sites: start from the exact base weights
                try:
                    fut.set_result(fn())
                except BaseException as e:
                    fut.set_exception(e)
            elif item is not None:
                self.waiting.append(item)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return

    def leave_queue(self, req: Any) -> None:
        self.waiting.remove(req)
        with self._count:
            self._pending -= 1

    def admit(self, room: int, budget: int | None = None) -> list[Any]:
        """Up to ``room`` waiting requests whose adapters are (now) loaded, oldest first.

        ``budget``: requests join while the prompt tokens joining in this step are fewer (the last one
        may pass it; the packed engine then prefills its prompt in pieces over the next steps).
        A request whose adapter cannot be loaded yet (``max_adapters`` reached, all of them held by
        running rows) blocks the requests behind it until a loaded adapter becomes idle."""
        new: list[Any] = []
        busy = self.busy()
        tokens = 0
        for req in list(self.waiting):
            if len(new) >= room:
                break
            if budget is not None and tokens >= budget:
                break
            if req.cancelled:
                self.leave_queue(req)
                self.metrics.request(self.endpoint, "cancelled")
                continue
            if req.adapter is not None:
                if req.adapter not in self.table.lru:
                    self.merged.release()
                try:
                    ready = self.table.ensure(req.adapter, busy)
                except AdapterNotFoundError as e:  # deleted after the request was checked, before it got here
                    self.leave_queue(req)
                    req.emit(Failed(404, f"{e} (it was deleted while the request waited)", "model", "model_not_found"))
                    continue
                except PeftkitError as e:
                    self.leave_queue(req)
                    req.emit(Failed(400, f"adapter {req.adapter!r} could not be loaded: {e}", "model"))
                    continue
                if not ready:
                    # every loaded adapter is in use: admit nothing behind this request (first come, first
                    # served), so the running rows drain and free an adapter for it instead of starving it
                    break
                busy.add(req.adapter)
            self.leave_queue(req)
            new.append(req)
            tokens += len(getattr(req, "prompt_ids", ()))
        return new

    endpoint = "generate"

    def fail_all(self, error: BaseException, status: int = 500) -> None:
        for r in self.running + self.waiting:
            r.emit(Failed(status, f"{type(error).__name__}: {error}"))
        with self._count:
            self._pending -= len(self.waiting)
        self.running, self.waiting = [], []
        self.reset()
        self.merged.release()

    def reset(self) -> None:
        """Drop per-batch state after a failure (subclasses)."""
