"""The store's writer thread: records handed over from the event loop, validated and committed in
batches (records that arrive together share one commit)."""
from __future__ import annotations

import concurrent.futures
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

from .chain import Receipt
from .records import Entry, RecordError, request_entry

BATCH = 256


def _resolve(fut: concurrent.futures.Future, result: Any = None, error: BaseException | None = None) -> None:
    """Settle a future. A caller that stopped waiting (cancelled) still gets its record written: every
    request is audited; only the answer goes nowhere."""
    try:
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


class RecordWriter:
    """Appends request records on a thread of its own (started with the first record)."""

    def __init__(self, append_entries: Callable[[Sequence[Entry]], list[Receipt]]):
        self._append_entries = append_entries
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, record: dict) -> concurrent.futures.Future:
        """The record's future receipt; leave ``record`` unmodified until it is settled."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("audit store is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="localist-audit-writer", daemon=True)
                self._thread.start()
            self._queue.put((record, fut))
        return fut

    def close(self) -> None:
        """Write what was submitted, then stop."""
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is not None:
            self._queue.put(None)
            thread.join()

    def _loop(self) -> None:
        done = False
        while not done:
            batch = [self._queue.get()]
            while len(batch) < BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if None in batch:
                done = True
                batch = [item for item in batch if item is not None]
            pending = []
            for record, fut in batch:
                try:
                    pending.append((request_entry(record), fut))
                except Exception as e:
                    _resolve(fut, error=e)
            if pending:
                self._commit(pending)

    def _commit(self, pending: list[tuple[Entry, concurrent.futures.Future]]) -> None:
        try:
            receipts = self._append_entries([e for e, _ in pending])
        except RecordError:  # a duplicate id: commit the others one by one
            for entry, fut in pending:
                try:
                    _resolve(fut, self._append_entries([entry])[0])
                except Exception as e:
                    _resolve(fut, error=e)
            return
        except Exception as e:
            for _, fut in pending:
                _resolve(fut, error=e)
            return
        for (_, fut), receipt in zip(pending, receipts):
            _resolve(fut, receipt)
