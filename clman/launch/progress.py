"""A run's epochs as a progress bar on the terminal of a quiet driver (``clman.launch.session.divert_stderr``)."""

from __future__ import annotations

import dataclasses
import logging
import threading

import ray

from clman import progress

log = logging.getLogger(__name__)


class ProgressBar:
    """A run's epochs as a tqdm bar on ``stream``, the saved terminal of a quiet driver.

    Rank 0 puts each epoch's metrics in a Ray queue (``worker.report``, through
    ``LoopInputs.progress``: ``self.job`` is the run's job given the queue); a thread here moves the
    bar. The queue's actor takes no CPU, so it never waits for the workers' resources. Where ``stream`` is not a terminal (``make demo
    > demo.log``), one plain line per epoch instead.
    """

    SHOWN = (("loss", "loss"), ("loss", "train_loss"), ("auc", "train_auc"), ("val auc", "val_auc"))

    def __init__(self, job, run_name: str, stream):
        from ray.util.queue import Queue
        from tqdm import tqdm

        self.queue = Queue(actor_options={"num_cpus": 0})
        self.job = dataclasses.replace(job, loop_config=job.loop_config.with_progress(self.queue))
        self.epochs = int(job.loop_config.config.epochs) or None
        self.run_name = run_name
        self.bar = (
            tqdm(total=self.epochs, desc=run_name, unit="epoch", file=stream, dynamic_ncols=False, ncols=100)
            if progress.is_tty(stream)
            else None
        )
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._follow, daemon=True)
        self.thread.start()

    def _follow(self) -> None:
        from ray.util.queue import Empty

        while not self.done.is_set():
            try:
                item = self.queue.get(timeout=0.5)
            except Empty:
                continue
            except Exception:  # the queue's actor is gone (Ray shutting down): no more bar
                return
            shown = {k: item[m] for k, m in self.SHOWN if isinstance(item.get(m), float) and item[m] == item[m]}
            if self.bar is None:
                log.info(
                    "%s epoch %d/%s  %s",
                    self.run_name,
                    item["epoch"],
                    self.epochs or "?",
                    "  ".join(f"{k} {v:.3f}" for k, v in shown.items()),
                )
                continue
            self.bar.n = item["epoch"]
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items()}, refresh=True)

    def close(self) -> None:
        self.done.set()
        self.thread.join(timeout=5)
        if self.bar is not None:
            self.bar.close()
        ray.kill(self.queue.actor)
