"""Eigenvalues of many weights' Gram matrices on one or several GPUs, with the CPU cores working alongside.

The spectra stage needs every eigenvalue of hundreds of n x n Gram matrices (n = 4096 for every
projection of a 7B Llama). A dense GPU eigensolver spends ~80 ms per such matrix in its
column-by-column tridiagonal reduction, so this module splits the work (a two-stage solver):

1. on the GPU, in float64: the Gram matrix ``W^T W`` (or ``W W^T``, the smaller), then a batched
   band reduction (``band_reduction``: matrix products, reading each matrix about once per panel,
   with each panel's Householder QR fused into one Triton kernel, ``triton_spectra.panel_qr``);
2. on the CPU cores, one matrix per thread: band -> tridiagonal (LAPACK ``dsbtrd``, ``lapack_band``),
   overlapped with the GPU working on the next batch;
3. tridiagonal -> eigenvalues: bisection in a Triton kernel on the GPU (``triton_spectra``, every
   eigenvalue to float32 precision) or LAPACK ``dsterf`` on the CPU thread (``SolverPlan.tridiagonal``).

Matrices smaller than ``SolverPlan.min_dim`` go to ``torch.linalg.eigvalsh`` in float64 instead.

Work arrives as ``Unit``s (a batch of in-memory weights, or one decoder layer read from disk or
generated): one thread per GPU takes units from a shared queue, so several GPUs share the work and
a unit is only loaded when a GPU is free for it. Progress is reported from the calling thread.
Optionally (``SolverPlan.graphs``) the band reduction of each batch shape is captured once in a CUDA
graph and replayed, which removes the Python launch cost of its thousands of small kernels.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

from .band_reduction import reduce_to_band
from .lapack_band import tridiagonal_eigenvalues, tridiagonalize
from .progress import ProgressFn, report

log = logging.getLogger(__name__)

TWO_STAGE_MIN_DIM = 2048  # below this a batched float64 eigvalsh is as fast and simpler
TRIDIAGONAL_STAGES = ("gpu", "cpu")
PANELS = ("triton", "torch")


@dataclass(frozen=True)
class SolverPlan:
    """How the two-stage solver runs; every setting leaves the eigenvalues unchanged beyond rounding."""

    bandwidth: int = 8  # half-width of the band; smaller = less GPU work per panel, more CPU work
    group: int = 64  # columns per trailing-matrix update (a multiple of bandwidth)
    tridiagonal: str = "gpu"  # "gpu": Triton bisection (float32-exact); "cpu": LAPACK dsterf (float64)
    panel: str = "triton"  # panel QR: "triton" (one kernel per panel) or "torch" (~17 launches per column)
    graphs: bool = False  # capture each band-reduction batch shape in a CUDA graph
    max_batch: int = 64  # matrices per band-reduction batch (also bounded by free GPU memory)
    min_dim: int = TWO_STAGE_MIN_DIM  # smaller Gram matrices go to a batched float64 eigvalsh

    def __post_init__(self) -> None:
        if self.tridiagonal not in TRIDIAGONAL_STAGES or self.panel not in PANELS:
            raise ValueError(f"unknown tridiagonal stage {self.tridiagonal!r} or panel {self.panel!r}")
        if self.bandwidth < 1 or self.group % self.bandwidth:
            raise ValueError(f"group ({self.group}) must be a multiple of the bandwidth ({self.bandwidth})")

    def describe(self) -> str:
        return (
            f"band {self.bandwidth}, group {self.group}, {self.panel} panels, tridiagonal on the {self.tridiagonal}, "
            f"{'CUDA graphs' if self.graphs else 'eager'}, batches of <= {self.max_batch}"
        )


def default_plan(device: torch.device) -> SolverPlan:
    """The plan for ``device``: Triton kernels on CUDA, PyTorch and LAPACK only on the CPU."""
    if device.type == "cuda":
        return SolverPlan()
    return SolverPlan(tridiagonal="cpu", panel="torch")


@dataclass
class Unit:
    """A piece of work: ``load(device)`` returns ``[(index, weight), ...]`` (weights on any device)."""

    load: Callable[[torch.device], list[tuple[int, torch.Tensor]]]
    label: str = ""


def gram_dim(shape: Sequence[int]) -> int:
    """Size of the smaller Gram matrix of a weight of this shape."""
    return int(min(shape[-2], shape[-1]))


def gram_matrix(weight: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The smaller Gram matrix of one weight, in float64, on the weight's device."""
    w = weight.detach().to(torch.float64)
    if w.shape[0] >= w.shape[1]:
        return torch.mm(w.mT, w, out=out)
    return torch.mm(w, w.mT, out=out)


def batch_size_for(dim: int, count: int, device: torch.device, plan: SolverPlan) -> int:
    """Matrices per band-reduction batch: at most ``plan.max_batch``, a quarter of the matrices (so
    CPU and GPU stages overlap) and what a third of the free GPU memory holds."""
    size = min(plan.max_batch, max(1, -(-count // 4)))
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        per_matrix = 8 * dim * dim * 2.5  # the matrix, the reduction's panels and accumulators, slack
        size = min(size, max(1, int(free // 3 // per_matrix)))
    return max(1, size)


def cpu_workers(devices: Sequence[torch.device]) -> int:
    """Threads for the LAPACK stage: every core but one per GPU-driving thread."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores - len(devices))


# --------------------------------------------------------------------------- CPU stage


def _cpu_stage(band: np.ndarray, tridiagonal: str, ready: Optional[torch.cuda.Event]):
    if ready is not None:
        ready.synchronize()  # the band's device-to-host copy
    d, e = tridiagonalize(band)
    if tridiagonal == "cpu":
        return tridiagonal_eigenvalues(d, e)
    return d, e


# --------------------------------------------------------------------------- one device


class _GraphedReduction:
    """The band reduction of one batch shape, captured once in a CUDA graph and replayed."""

    def __init__(self, batch: int, dim: int, plan: SolverPlan, device: torch.device, panel_qr) -> None:
        self.input = torch.zeros(batch, dim, dim, dtype=torch.float64, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up: library handles, workspaces and kernels exist before the capture
            reduce_to_band(self.input, plan.bandwidth, plan.group, panel_qr)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the other GPU's thread and the LAPACK threads keep allocating and synchronising
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.output = reduce_to_band(self.input, plan.bandwidth, plan.group, panel_qr)

    def run(self) -> torch.Tensor:
        self.graph.replay()
        return self.output


@dataclass
class _Pending:
    indices: list[int]
    futures: list[Future]
    label: str
    stage: str  # where the tridiagonal eigenvalues are found: "cpu" (the futures return them) or "gpu"


class _DeviceWorker:
    """Drives one device: Gram matrices, band reduction, hand-off to the CPU pool, bisection."""

    def __init__(self, device: torch.device, plan: SolverPlan, pool: ThreadPoolExecutor, events: queue.Queue) -> None:
        if device.type == "cuda" and device.index is None:  # set_device needs an index
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.plan = plan
        self.pool = pool
        self.events = events
        self.graphs: dict[tuple[int, int], _GraphedReduction] = {}
        self.copy_streams: dict[torch.device, torch.cuda.Stream] = {}
        self.bisect = self.panel_qr = None
        if plan.panel == "triton" or plan.tridiagonal == "gpu":
            try:  # optional: Triton needs a GPU (or TRITON_INTERPRET=1 on the CPU)
                from . import triton_spectra

                self.bisect = triton_spectra.tridiagonal_eigenvalues
                self.panel_qr = triton_spectra.panel_qr if plan.panel == "triton" else None
            except Exception as exc:  # no Triton, or no backend for this device
                log.warning("Triton kernels unavailable (%s); using PyTorch panels and LAPACK dsterf", exc)
                self.plan = replace(plan, tridiagonal="cpu", panel="torch")

    def run(self, next_unit: Callable[[], Optional[Unit]]) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        pending: deque[_Pending] = deque()
        while (unit := next_unit()) is not None:
            items = unit.load(self.device)
            by_dim: dict[int, list[tuple[int, torch.Tensor]]] = {}
            for index, weight in items:
                by_dim.setdefault(gram_dim(weight.shape), []).append((index, weight))
            del items
            for dim in list(by_dim):
                self._solve_group(dim, by_dim.pop(dim), unit.label, pending)  # pop: a streamed layer's
                # weights are freed as soon as their Gram matrices exist
            self._finish(pending, block=False)
        self._finish(pending, block=True)

    def _grams(self, group: list[tuple[int, torch.Tensor]], dim: int, out: torch.Tensor) -> None:
        for slot, (_, weight) in enumerate(group):
            gram_matrix(self._fetch(weight), out=out[slot])

    def _fetch(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight on this device. A copy from another GPU runs on a side stream of that GPU: PyTorch
        copies on the source's current stream, which is busy with the other thread's work and would make
        this GPU wait for all of it."""
        if weight.device == self.device or weight.device.type != "cuda" or self.device.type != "cuda":
            return weight.to(self.device, non_blocking=True)
        stream = self.copy_streams.get(weight.device)
        if stream is None:
            stream = self.copy_streams[weight.device] = torch.cuda.Stream(weight.device)
        with torch.cuda.stream(stream):
            return weight.to(self.device, non_blocking=True)

    def _solve_group(self, dim: int, group: list[tuple[int, torch.Tensor]], label: str, pending: deque) -> None:
        indices = [index for index, _ in group]
        if dim < self.plan.min_dim or dim <= self.plan.bandwidth + 1:
            grams = torch.empty(len(group), dim, dim, dtype=torch.float64, device=self.device)
            self._grams(group, dim, grams)
            values = torch.linalg.eigvalsh(grams).cpu().numpy()
            self.events.put(("done", indices, list(values), label))
            return
        band = self._band(dim, group)
        ready = None
        if self.device.type == "cuda":
            host = torch.empty(band.shape, dtype=band.dtype, pin_memory=True)
            host.copy_(band, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        else:
            host = band
        bands = host.numpy()
        stage = self.plan.tridiagonal
        futures = [self.pool.submit(_cpu_stage, bands[slot], stage, ready) for slot in range(len(group))]
        pending.append(_Pending(indices, futures, label, stage))

    def _band(self, dim: int, group: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
        """Band form of the group's Gram matrices (a graph of a larger batch pads with zero matrices)."""
        if self.plan.graphs and self.device.type == "cuda":
            fits = [key for key in self.graphs if key[1] == dim and key[0] >= len(group)]
            graphed = self.graphs[min(fits)] if fits else None
            if graphed is None:
                try:
                    graphed = self.graphs[(len(group), dim)] = _GraphedReduction(
                        len(group), dim, self.plan, self.device, self.panel_qr
                    )
                except Exception as exc:  # capture is an optimisation: fall back to eager launches
                    log.warning("CUDA graph capture of the band reduction failed (%s); running eagerly", exc)
                    self.plan = replace(self.plan, graphs=False)
            if graphed is not None:
                self._grams(group, dim, graphed.input)
                graphed.input[len(group):] = 0
                return graphed.run()[: len(group)]
        grams = torch.empty(len(group), dim, dim, dtype=torch.float64, device=self.device)
        self._grams(group, dim, grams)
        if self.panel_qr is not None:
            try:
                return reduce_to_band(grams, self.plan.bandwidth, self.plan.group, self.panel_qr)
            except Exception as exc:  # a kernel that does not build here: the PyTorch panels give the same band
                log.warning("Triton panel QR failed (%s); using PyTorch panels", exc)
                self.panel_qr, self.plan = None, replace(self.plan, panel="torch")
                self._grams(group, dim, grams)  # the failed attempt overwrote part of them
        return reduce_to_band(grams, self.plan.bandwidth, self.plan.group)

    def _finish(self, pending: deque, block: bool) -> None:
        """Eigenvalues of the pending groups whose CPU stage is complete, oldest first."""
        while pending and (block or all(f.done() for f in pending[0].futures)):
            item = pending.popleft()
            results = [f.result() for f in item.futures]
            values = results if item.stage == "cpu" else self._bisect(results)
            self.events.put(("done", item.indices, values, item.label))

    def _bisect(self, tridiagonals: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        if self.bisect is not None:
            try:
                d = torch.from_numpy(np.stack([t[0] for t in tridiagonals])).to(self.device)
                e = torch.from_numpy(np.stack([t[1] for t in tridiagonals])).to(self.device)
                return list(self.bisect(d, e).cpu().numpy().astype(np.float64))
            except Exception as exc:  # a kernel that does not build here: LAPACK gives the same eigenvalues
                log.warning("Triton bisection failed (%s); tridiagonal eigenvalues by LAPACK dsterf", exc)
                self.bisect, self.plan = None, replace(self.plan, tridiagonal="cpu")
        return [tridiagonal_eigenvalues(d, e) for d, e in tridiagonals]


# --------------------------------------------------------------------------- several devices


def solve(
    units: Iterable[Unit],
    total: int,
    devices: Sequence[torch.device],
    plan: Optional[SolverPlan] = None,
    progress: Optional[ProgressFn] = None,
) -> dict[int, np.ndarray]:
    """Eigenvalues (ascending, float64 arrays) of every weight the units yield, keyed by index.

    One thread per device takes units from ``units`` until it is exhausted; ``total`` is the number
    of weights, for progress. Errors in any thread are raised here.
    """
    devices = [torch.device(d) for d in devices]
    plan = plan or default_plan(devices[0])
    if len(devices) > 1 and plan.graphs:
        # Two threads capturing CUDA graphs at once broke on 2 H200s (torch 2.11: the capture is
        # invalidated and the failed graph's destructor aborts the process); graphs save ~7% on one GPU.
        plan = replace(plan, graphs=False)
    source: Iterator[Unit] = iter(units)
    lock = threading.Lock()
    stop = threading.Event()
    events: queue.Queue = queue.Queue()

    def next_unit() -> Optional[Unit]:
        with lock:
            if stop.is_set():
                return None
            return next(source, None)

    results: dict[int, np.ndarray] = {}
    with ThreadPoolExecutor(max_workers=cpu_workers(devices), thread_name_prefix="acttail-lapack") as pool:
        workers = [_DeviceWorker(device, plan, pool, events) for device in devices]

        def drive(worker: _DeviceWorker) -> None:
            try:
                worker.run(next_unit)
                events.put(("finished",))
            except BaseException as exc:  # handed to the calling thread, which raises it
                stop.set()
                events.put(("error", exc))

        threads = [
            threading.Thread(target=drive, args=(w,), name=f"acttail-{w.device}-{k}", daemon=True)
            for k, w in enumerate(workers)
        ]
        for thread in threads:
            thread.start()
        running, error = len(threads), None
        while running:
            event = events.get()
            if event[0] == "done":
                _, indices, values, label = event
                for index, value in zip(indices, values):
                    results[index] = np.asarray(value, dtype=np.float64)
                where = f"{label}: " if label else ""
                report(progress, len(results), total, f"{where}eigenvalues {len(results)}/{total}")
            else:
                running -= 1
                if event[0] == "error" and error is None:
                    error = event[1]
        for thread in threads:
            thread.join()
    if error is not None:
        raise error
    return results


def visible_devices(target: torch.device) -> list[torch.device]:
    """The devices spectra run on: every visible GPU for plain ``cuda``, else just ``target``."""
    if target.type == "cuda" and target.index is None:  # workers pin their thread to an indexed device
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return [target]


__all__ = [
    "SolverPlan",
    "Unit",
    "TWO_STAGE_MIN_DIM",
    "TRIDIAGONAL_STAGES",
    "PANELS",
    "default_plan",
    "gram_dim",
    "gram_matrix",
    "batch_size_for",
    "solve",
    "visible_devices",
]
