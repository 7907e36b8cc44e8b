"""The tqdm progress bar of long work (k-means, calibration, pruning), in one place: ``bar(enabled, ...)``
gives a tqdm bar, or a stand-in with the same methods that prints nothing when ``enabled`` is False."""
from __future__ import annotations


class NoBar:
    def update(self, n=1):
        pass

    def set_postfix(self, *a, **k):
        pass

    def close(self):
        pass


def bar(enabled: bool, **kw):
    """tqdm(**kw) (imported only when a bar is wanted) or a silent NoBar."""
    if not enabled:
        return NoBar()
    from tqdm.auto import tqdm
    return tqdm(**kw)
