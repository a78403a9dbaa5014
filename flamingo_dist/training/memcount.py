"""Tensor accounting: the bytes of live tensor storages on a device, and their peak, measured
without the allocator (on CPU the process RSS holds the interpreter, the libraries and freed
memory glibc keeps: a 0.7 MB model in a 720 MB process). Used to check the capacity planner's
memory model against real steps (tests/test_plan.py); on a GPU `torch.cuda.max_memory_allocated`
measures the same thing.

    with LiveBytes() as live:      # every tensor alive now is counted from the start
        trainer.train_step()
    live.peak, live.current

    before = live_storages()         # or: count only what was made after this point
    trainer = build(...)
    with LiveBytes(ignore=before) as live: ...

The tensors alive on entry are found by the garbage collector (parameters, buffers, optimizer
states, DeepSpeed's flat buffers: everything Python holds); every storage made inside is seen by
a `TorchDispatchMode` as an operator's output and uncounted when it is freed (storages keep one
Python object while alive, so a weak reference to it tells when). Storages are counted once,
however many views share them. Not seen: storages made inside and never returned by an operator
(none in a training step: allocation is an operator), and memory of other devices.
"""

from __future__ import annotations

import gc
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _tensors():
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor):
                yield obj
        except ReferenceError:  # a dead weak proxy
            continue


def live_storages() -> weakref.WeakValueDictionary:
    """The storages Python holds now (weakly: they may die later)."""
    out = weakref.WeakValueDictionary()
    for t in _tensors():
        try:
            st = t.untyped_storage()
        except (NotImplementedError, RuntimeError):
            continue
        out[id(st)] = st
    return out


class LiveBytes(TorchDispatchMode):
    def __init__(self, device: str = "cpu", ignore: weakref.WeakValueDictionary | None = None):
        super().__init__()
        self._ignore = ignore if ignore is not None else {}
        self.device_type = torch.device(device).type
        self.current = 0
        self.peak = 0
        self._live: dict[int, int] = {}  # id of the storage's Python object -> bytes
        self._since = 0  # the peak since the last mark
        self.marks: list[tuple[str, int, int]] = []

    def mark(self, name: str) -> None:
        """Record (name, bytes live now, peak since the previous mark): where in a step the peak is."""
        self.marks.append((name, self.current, self._since))
        self._since = self.current

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def _bump(self) -> None:
        self.peak = max(self.peak, self.current)
        self._since = max(self._since, self.current)

    def _track(self, t: torch.Tensor) -> None:
        if t.device.type != self.device_type or t.is_meta:
            return
        try:
            storage = t.untyped_storage()
        except (NotImplementedError, RuntimeError):  # tensors without storage (e.g. sparse, functional wrappers)
            return
        key = id(storage)
        if self._ignore.get(key) is storage:
            return
        nbytes = storage.nbytes()
        old = self._live.get(key)
        if old is not None:  # already counted; a storage resized in place changes its bytes
            if old != nbytes:
                self.current += nbytes - old
                self._live[key] = nbytes
                self._bump()
            return
        self._live[key] = nbytes
        self.current += nbytes
        self._bump()
        weakref.finalize(storage, self._free, key)

    def __enter__(self) -> "LiveBytes":
        for t in _tensors():
            self._track(t)
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out
