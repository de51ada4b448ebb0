"""Every use of a private Lightning internal, in one place.

Lightning offers no public way to draw batches from the fit loop's train iterator before the
loop does, yet that is what replaying an interrupted epoch's data order takes (see
:mod:`.data_order`).  So this module, and only this one, reaches into the fit loop's data
fetcher.  :func:`problems` lists what of it the installed Lightning no longer has; the test
suite fails on any (``tests/e2e/test_integration_lightning.py``), so an update that changes
these internals breaks loudly instead of silently replaying the wrong order.

What is relied on (Lightning 2.x, checked with 2.6):

- ``trainer.fit_loop._data_fetcher``: the fetcher the epoch loop draws train batches from;
- ``lightning.pytorch.loops.fetchers._PrefetchDataFetcher``: the fetcher for sized data, with
  ``batches`` (the batches drawn ahead), ``iterator`` (the combined loader's iterator, which
  the loop advances) and ``iter(fetcher)`` (a new iterator for the epoch);
- the text of the warning ``_TrainingEpochLoop`` gives on a mid-epoch resume of a plain loader
  (:data:`NOT_RESUMABLE`), silenced after a replay made it wrong.
"""

from __future__ import annotations

import inspect
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loops import training_epoch_loop
from lightning.pytorch.loops.fetchers import _PrefetchDataFetcher
from lightning.pytorch.utilities import CombinedLoader

__all__ = ["NOT_RESUMABLE", "plain_fetcher", "prefetched", "problems", "restart_epoch", "skip_batches"]

#: the start of the warning Lightning gives when resuming mid-epoch from a plain dataloader
NOT_RESUMABLE = "You're resuming from a checkpoint that ended before the epoch ended"


def _fetcher(trainer: pl.Trainer) -> Any:
    return getattr(trainer.fit_loop, "_data_fetcher", None)


def prefetched(trainer: pl.Trainer) -> int:
    """How many train batches the fit loop's fetcher has drawn ahead of the loop (0 without one)."""
    return len(getattr(_fetcher(trainer), "batches", None) or [])


def plain_fetcher(trainer: pl.Trainer) -> Any | None:
    """The fit loop's fetcher if it is Lightning's plain one for sized data, else None (the
    ``dataloader_iter`` fetcher and unknown ones are not replayed)."""
    fetcher = _fetcher(trainer)
    return fetcher if type(fetcher) is _PrefetchDataFetcher else None


def restart_epoch(fetcher: Any) -> None:
    """A new epoch iterator over the train loaders: it draws a fresh shuffle from their generators."""
    iter(fetcher)


def skip_batches(fetcher: Any, n: int) -> None:
    """Draw ``n`` batches from the fetcher's iterator without the loop seeing them."""
    assert fetcher.iterator is not None, "the fit loop's data fetcher has no iterator yet"
    for _ in range(n):
        next(fetcher.iterator)


def problems() -> list[str]:
    """What this shim relies on that the installed Lightning lacks or does differently (empty
    when all holds): each function above is tried on a real fit loop and fetcher."""
    found: list[str] = []
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    if not hasattr(trainer.fit_loop, "_data_fetcher"):
        found.append("the fit loop has no _data_fetcher")
    fetcher = _PrefetchDataFetcher()
    fetcher.setup(CombinedLoader([[10, 11, 12]], "max_size_cycle"))
    try:
        restart_epoch(fetcher)
        ahead = list(fetcher.batches)
        skip_batches(fetcher, 1)
        batch = next(fetcher)
    except Exception as exc:  # noqa: BLE001 - any failure is the news
        found.append(f"drawing from a _PrefetchDataFetcher failed: {type(exc).__name__}: {exc}")
    else:
        if ahead:
            found.append("a _PrefetchDataFetcher over sized data prefetches batches")
        if not (isinstance(batch, tuple) and batch[0] == [11]):
            found.append(f"after skipping one batch the fetcher gave {batch!r}, expected the second")
    if NOT_RESUMABLE not in inspect.getsource(training_epoch_loop):
        found.append(f"the training epoch loop no longer warns {NOT_RESUMABLE!r}")
    return found
