"""DenseCRF jobs and the fault-tolerant process pool that runs them (WeCLIP inference §8.1 step 6, CLIP-ES §5.3).

The pool's results are counted against its inputs: an image whose CRF raises or whose worker process dies is re-run
(`eval.crf_retries` times; a crash alone in a fresh pool, so that the crash is charged to the right image) and
otherwise fails the run with an error naming it. A report built from the pool therefore always counts every image.
"""
from __future__ import annotations

import multiprocessing
import os
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np

from weclip.pipeline.config import CrfParams, EvalConfig
from weclip.pipeline.errors import CrfError
from weclip.pipeline.refinement.crf import crf_labels, dense_crf

T = TypeVar("T")
CRF_FAULT_ENV = "WECLIP_CRF_FAULT"


@dataclass(frozen=True)
class CrfJob:
    """One image's DenseCRF: `image` H×W×3 uint8 (what the bilateral term compares), `probs` K×H×W scores, `keys` the
    label of each channel; `confidence` (CLIP-ES CGL) turns pixels whose posterior max is below it into 255."""
    key: str
    image: np.ndarray
    probs: np.ndarray
    keys: np.ndarray
    params: CrfParams
    confidence: float | None = None


def _inject_fault(key: str, attempt: int) -> None:
    """Test hook: WECLIP_CRF_FAULT="<raise|exit>:<n>:<image key>" makes the CRF of that image raise, or kill its
    worker process (`exit`, only inside a pool worker; in the main process it raises), on its first n attempts
    (n = 0: on every attempt). Unset in normal use."""
    spec = os.environ.get(CRF_FAULT_ENV)
    if not spec:
        return
    mode, times, target = spec.split(":", 2)
    if target != key or (int(times) and attempt >= int(times)):
        return
    if mode == "exit" and multiprocessing.parent_process() is not None:
        os._exit(70)
    raise RuntimeError(f"injected CRF fault ({CRF_FAULT_ENV}={spec})")


def crf_job(job: CrfJob, attempt: int = 0) -> np.ndarray:
    """Run one job: H×W uint8 labels = keys[argmax Q] (255 where below `confidence`)."""
    _inject_fault(job.key, attempt)
    posterior = dense_crf(job.image, job.probs, job.params)
    return crf_labels(posterior, job.keys, job.confidence).astype(np.uint8)


def _pool_context() -> multiprocessing.context.BaseContext:
    """fork where the OS has it: a worker only runs numpy + pydensecrf (no torch, no OpenMP), and a spawned worker
    would re-import torch and open_clip first (~10 s each on the 2-core dev machine)."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


class CrfPool:
    """Runs `CrfJob`s in `workers` processes (0 = in this process) and yields exactly one result per job.

    `imap` pulls jobs lazily (at most 2 × workers in flight, so the producer — the backbone — runs while the CRF
    works). A job that raises is re-run up to `retries` times. A dead worker breaks the whole pool: the images it
    took down are re-run one at a time in a fresh pool, so that a crash is charged to the image that caused it
    (innocent images are not charged), and an image that still fails after `retries` re-runs raises CrfError
    naming it. Results are counted against the jobs taken; any difference raises.
    """

    def __init__(self, workers: int, retries: int) -> None:
        if workers < 0 or retries < 0:
            raise CrfError(f"CRF workers and retries must be >= 0, got {workers} and {retries}")
        self.workers, self.retries = workers, retries

    def _charge(self, job: CrfJob, attempt: int, reason: str) -> int:
        if attempt >= self.retries:
            raise CrfError(f"DenseCRF failed for image {job.key} on all {attempt + 1} attempt(s): {reason}. "
                           "The run is stopped rather than reporting fewer images; fix the cause (memory, image) or "
                           "raise eval.crf_retries")
        return attempt + 1

    def imap(self, jobs: Iterable[CrfJob]) -> Iterator[tuple[str, np.ndarray]]:
        if self.workers == 0:
            yield from self._inline(jobs)
        else:
            yield from self._pooled(jobs)

    def _inline(self, jobs: Iterable[CrfJob]) -> Iterator[tuple[str, np.ndarray]]:
        for job in jobs:
            attempt = 0
            while True:
                try:
                    labels = crf_job(job, attempt)
                    break
                except Exception as exc:  # any failure of one image's CRF is charged to that image
                    attempt = self._charge(job, attempt, f"{type(exc).__name__}: {exc}")
            yield job.key, labels

    def _pooled(self, jobs: Iterable[CrfJob]) -> Iterator[tuple[str, np.ndarray]]:
        source = iter(jobs)
        limit = 2 * self.workers
        executor: ProcessPoolExecutor | None = None
        in_flight: dict[Future, tuple[CrfJob, int, bool]] = {}  # future -> (job, attempt, alone in the pool)
        retry: deque[tuple[CrfJob, int]] = deque()  # raised: re-run normally
        isolate: deque[tuple[CrfJob, int]] = deque()  # in flight when a worker died: re-run one at a time
        taken = returned = 0
        exhausted = False

        def next_job() -> tuple[CrfJob, int, bool] | None:
            nonlocal taken, exhausted
            if isolate:
                return None if in_flight else (*isolate.popleft(), True)
            if len(in_flight) >= limit:
                return None
            if retry:
                return (*retry.popleft(), False)
            job = None if exhausted else next(source, None)
            exhausted = job is None
            taken += not exhausted
            return None if job is None else (job, 0, False)

        try:
            while True:
                while (entry := next_job()) is not None:
                    job, attempt, alone = entry
                    executor = executor or ProcessPoolExecutor(self.workers, mp_context=_pool_context())
                    try:
                        in_flight[executor.submit(crf_job, job, attempt)] = entry
                    except BrokenProcessPool:  # a worker died since the last wait; its own future reports it
                        (isolate if alone else retry).appendleft((job, attempt))
                        if in_flight:
                            break
                        executor.shutdown(wait=True, cancel_futures=True)
                        executor = None
                if not in_flight:
                    break
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                if any(isinstance(f.exception(), BrokenProcessPool) for f in done):
                    done, _ = wait(in_flight)  # the pool is dead: every other future is finished or lost too
                    executor.shutdown(wait=True, cancel_futures=True)
                    executor = None
                for future in done:
                    job, attempt, alone = in_flight.pop(future)
                    error = future.exception()
                    if error is None:
                        returned += 1
                        yield job.key, future.result()
                    elif isinstance(error, BrokenProcessPool):
                        if alone:
                            attempt = self._charge(job, attempt, "its worker process died (killed, out of memory "
                                                                 "or crashed)")
                        isolate.append((job, attempt))
                    else:
                        retry.append((job, self._charge(job, attempt, f"{type(error).__name__}: {error}")))
        finally:
            if executor is not None:
                executor.shutdown(wait=True, cancel_futures=True)
        if returned != taken:
            raise CrfError(f"the CRF pool returned {returned} results for {taken} images")


def labelled(items: Iterable[T], predict: Callable[[T], np.ndarray | CrfJob], pool: CrfPool | None
             ) -> Iterator[tuple[T, np.ndarray]]:
    """(item, H×W uint8 labels) for every item: `predict` gives the labels, or with a pool a CrfJob (keys unique
    among the items) that runs there; results may then come back out of order."""
    if pool is None:
        for item in items:
            yield item, predict(item)
        return
    pending: dict[str, T] = {}

    def jobs() -> Iterator[CrfJob]:
        for item in items:
            job = predict(item)
            if job.key in pending:
                raise ValueError(f"two images share the CRF job key {job.key!r}")
            pending[job.key] = item
            yield job

    for key, labels in pool.imap(jobs()):
        yield pending.pop(key), labels




def crf_pool(crf: bool, cfg: EvalConfig, workers: int | None) -> CrfPool | None:
    """The pool for `cfg` (None when the CRF is off); `workers` overrides `eval.crf_workers`."""
    return CrfPool(cfg.crf_workers if workers is None else workers, cfg.crf_retries) if crf else None
