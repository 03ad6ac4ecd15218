"""NVTX ranges: one reusable object per stage name, a no-op without ``nvtx``."""

from __future__ import annotations

import contextlib
import sys
import threading

from zarrdali import trace


def test_ranges_are_made_once_and_nest(monkeypatch):
    monkeypatch.setattr(trace, "_ranges", {})
    plan = trace.annotate("zarrdali.plan")
    assert trace.annotate("zarrdali.plan") is plan
    with plan, trace.annotate("zarrdali.load"), plan:  # reentrant, nested
        pass

    def in_threads():
        for _ in range(100):
            with trace.annotate("zarrdali.plan"), trace.annotate("zarrdali.load"):
                pass

    threads = [threading.Thread(target=in_threads) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(trace._ranges) == {"zarrdali.plan", "zarrdali.load"}


def test_without_nvtx_every_range_is_a_no_op(monkeypatch):
    monkeypatch.setattr(trace, "_ranges", {})
    monkeypatch.setitem(sys.modules, "nvtx", None)  # import nvtx raises ImportError
    r = trace.annotate("zarrdali.hand_over")
    assert isinstance(r, contextlib.nullcontext)
    with r:
        pass
