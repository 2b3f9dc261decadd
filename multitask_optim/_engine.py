"""Choosing the gradient path: ``gradient_mode="auto"`` measures, the others are fixed.

The paths themselves (all exact) are in :mod:`._jacobian`; this module decides which
one computes a step. ``auto`` times every applicable path on the first real steps of a
model (per *signature*: the number of losses, which shared parameters each reaches, the
shapes of the shared graph), as ``torch.backends.cudnn.benchmark`` does for convolution
algorithms, and keeps the fastest. Steps too small for the choice to matter are not
measured (:data:`MEASURE_ABOVE`, :data:`LOOP_BELOW`): the decision then reads only the
graph's metadata and is deterministic. Representation mode's two head paths
(:mod:`._representation`) are chosen the same way (:class:`HeadPaths`).
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._gradients import TaskGradients
from ._graph import LossGraph
from ._jacobian import MODES, defers, run_path
from ._representation import HeadMap, dense_rows, factored_is_cheaper, factored_rows, head_maps

#: Unmeasured order: the first path that works is kept (vmap limitations fall through).
FALLBACK = ("frontier", "batched", "looped")
#: Below this much work (same measure as :data:`MEASURE_ABOVE`) a step costs its calls,
#: not its arithmetic: ``looped`` makes K ordinary backward calls where ``frontier`` makes
#: K head calls plus one vmapped trunk call, so it goes first (measured on MLPs of
#: 2-4 tasks: 6-15% faster up to about 10^5; the frontier wins from about 4 x 10^5).
LOOP_BELOW = 1 << 17
#: ``auto`` measures only when a step is big enough for the choice to matter: K times
#: the elements of every activation gradient in the shared graph (from the graph's
#: metadata, so the decision itself is deterministic). Below it the first path of
#: :data:`FALLBACK` that works is used, as without measuring.
MEASURE_ABOVE = 1 << 22
#: Steps over which ``auto`` measures (each path's best time counts); paths slower than
#: ``PRUNE`` times the fastest in a trial are not run again.
TRIALS = 2
PRUNE = 2.0
#: Relative disagreement (to the largest Gram entry) above which a measured path is
#: dropped: every path is exact, so only a path that cannot see something the engine
#: does (a tensor hook on an intermediate, for the native walk) can differ.
AGREEMENT = 1e-3
#: ``auto`` does not measure the paths that build every task's full gradient buffer
#: (``batched``, ``looped``: K x P elements) when that buffer would exceed this many
#: bytes and a factored path exists: they would set the run's peak memory.
JACOBIAN_BUDGET = 256 * 2**20
#: The clock ``auto`` times the paths with (seconds; only differences are used). The one
#: place wall-clock time enters the library: the tests put a deterministic clock here.
clock: Callable[[], float] = time.perf_counter
Signature = Tuple[object, ...]


class Trials:
    """What a measured choice of path remembers, per *signature*, and when.

    A step proposes what it ran (:meth:`propose`: the path, and its timings when it
    measured); only a taken step keeps it (:meth:`commit`), a skipped or refused one
    leaves no trace (:meth:`forget`). After :data:`TRIALS` measured steps of a signature
    the fastest path (best of its trials; ties to the earlier in ``paths``) is its
    choice. :meth:`remembered` is what a checkpoint records; :meth:`restore_choice` sets
    it back, used for the next signature instead of measuring.

    Args:
        paths: the candidate paths, in order of preference.
    """

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = tuple(paths)
        #: best-of-trials ms per path behind the last measured choice (empty before one)
        self.measurements: Dict[str, float] = {}
        self._remembered: Optional[str] = None
        self._choices: Dict[Signature, str] = {}
        self._history: Dict[Signature, Dict[str, List[float]]] = {}
        self._pending: Optional[Tuple[Signature, Optional[Dict[str, float]], str]] = None
        self._restored: Optional[str] = None

    def remembered(self) -> Optional[str]:
        """The choice a checkpoint records: the last committed one (None before any)."""
        return self._remembered

    def chosen(self, signature: Signature) -> Optional[str]:
        """The path kept for ``signature``, else a restored one, else None (measure or rule)."""
        return self._choices.get(signature) or self._restored

    def propose(self, signature: Signature, path: str, times: Optional[Dict[str, float]] = None) -> None:
        """This step ran ``path`` (and measured ``times``, ms per path); kept if it is committed."""
        self._pending = (signature, times, path)

    def commit(self) -> None:
        """The step was taken: keep what it measured or chose."""
        if self._pending is None:
            return
        signature, times, path = self._pending
        self._pending = None
        if times is None:  # a remembered, restored or unmeasured choice
            self._choices[signature] = self._remembered = path
            self._restored = None
            return
        history = self._history.setdefault(signature, {})
        for name, ms in times.items():
            history.setdefault(name, []).append(ms)
        if max(len(v) for v in history.values()) >= TRIALS:
            best = min(history, key=lambda name: (min(history[name]), self.paths.index(name)))
            self.measurements = {name: min(v) for name, v in history.items()}
            self._choices[signature] = self._remembered = best
            self._restored = None
            del self._history[signature]
            self._chose(best)

    def _chose(self, best: str) -> None:
        """A measured choice was just made (subclasses follow it)."""

    def forget(self) -> None:
        """The step was skipped or refused: what it measured or chose is dropped."""
        self._pending = None

    def restore_choice(self, path: str) -> None:
        """Forget every choice and measurement; use ``path`` for the next signature seen."""
        self._choices.clear()
        self._history.clear()
        self._restored = self._remembered = path


class GradientEngine(Trials):
    """Computes :class:`TaskGradients` by one of several exact paths, measured or fixed.

    With ``mode="auto"`` the first steps on a model (for each *signature*: number of
    losses, which shared parameters each reaches, and the shapes in the shared graph)
    time every applicable path on the real step, the graph kept between them
    (``retain_graph``), and keep the fastest -- as ``torch.backends.cudnn.benchmark``
    does for convolution algorithms. The gradients used on a measuring step come from
    one path only, the first of :data:`MODES` that works, so a measuring step does not
    depend on the timings. Every path is exact, but their summation orders differ: the
    chosen path can change the float rounding of results, so runs that must be bitwise
    reproducible (across machines or loads) should set an explicit ``gradient_mode``.
    Small steps (:data:`MEASURE_ABOVE`) are not measured: the first of ``frontier ->
    batched -> looped`` that works is used, and on the smallest (:data:`LOOP_BELOW`)
    ``looped``, whose K plain backward calls cost less than the frontier's K + 1.

    A choice (and the timings behind it) is remembered only when the optimizer commits
    the step (:meth:`commit`): a skipped or refused step leaves no trace (:meth:`forget`;
    see :class:`Trials`). The checkpoint stores the current choice (``gradient_mode``); a
    restored engine uses it for the next signature it sees instead of measuring.

    Args:
        mode: ``"auto"`` or one of ``"lean"``, ``"frontier"``, ``"native"``, ``"batched"``,
            ``"looped"`` (see the module docstring).
        factored: whether linear layers may stay factored (not with per-task
            preconditioning or an aggregator that needs the Jacobian's rows).
    """

    def __init__(self, mode: str = "auto", factored: bool = True) -> None:
        if mode != "auto" and mode not in MODES:
            raise ValueError(f"gradient mode must be 'auto' or one of {MODES}, got {mode!r}")
        if mode == "lean" and not factored:
            raise ValueError(
                "gradient_mode='lean' keeps linear layers factored, which per-task preconditioning and "
                "Jacobian-based aggregators cannot use"
            )
        super().__init__(MODES)
        self.requested = mode
        self.factored = factored
        #: the path of the step computed last (None before any, or after a skipped first step)
        self.mode: Optional[str] = None if mode == "auto" else mode
        #: ms per path measured on the step computed last (empty when it was not measured)
        self.timings: Dict[str, float] = {}
        self._remembered = None if mode == "auto" else mode
        #: representation mode's head path, chosen alike and committed with the same steps
        self.heads = HeadPaths(measure=mode == "auto", lean=mode == "lean")

    @property
    def confirmed(self) -> bool:
        """Whether ``mode`` is a committed choice (what the checkpoint records)."""
        return self.mode is not None and self.mode == self._remembered

    def commit(self) -> None:
        """The step was taken: keep what it (and representation mode's head path) measured or chose."""
        self.heads.commit()
        super().commit()

    def _chose(self, best: str) -> None:
        self.mode = best

    def forget(self) -> None:
        """The step was skipped or refused: what it measured or chose is dropped."""
        self.heads.forget()
        super().forget()
        if self.requested == "auto":
            self.mode = self._remembered

    def restore(self, mode: Optional[str]) -> None:
        """Set a remembered choice (from a checkpoint): used for the next signature instead of measuring."""
        if mode is not None and self.requested == "auto":
            self.restore_choice(mode)
            self.mode = mode

    def compute(
        self,
        losses: Sequence[Tensor],
        graph: LossGraph,
        shared: Sequence[Tensor],
        tasks: Sequence[Sequence[Tensor]],
        defer: bool = False,
        keep: bool = False,
    ) -> TaskGradients:
        """The step's per-task gradients. ``defer``: the caller combines every shared
        parameter with one set of coefficients, once (see :func:`._jacobian.run_path`).
        ``keep``: the graph stays usable afterwards (weights-only mode: the caller runs the
        backward, which is also the update of the Gram-only walk, so that walk is taken
        wherever it holds less: :func:`._native.defers` with threshold 0)."""
        above = 0 if keep else None
        if self.requested != "auto":
            assert self.mode is not None
            return run_path(self.mode, losses, graph, shared, tasks, keep, self.factored, defer, above)
        signature, work = _signature(losses, graph, shared)
        chosen = self.chosen(signature)
        self.timings = {}
        if chosen is not None:
            self.mode = chosen
            self.propose(signature, chosen)
            return run_path(chosen, losses, graph, shared, tasks, keep, self.factored, defer, above)
        if work < MEASURE_ABOVE:
            order = ("looped",) if work < LOOP_BELOW else FALLBACK
            result, mode = self._first(order, losses, graph, shared, tasks)
            self.mode = mode
            self.propose(signature, mode)
            return result
        return self._measure(signature, losses, graph, shared, tasks, defer, above)

    def _first(
        self,
        candidates: Sequence[str],
        losses: Sequence[Tensor],
        graph: LossGraph,
        shared: Sequence[Tensor],
        tasks: Sequence[Sequence[Tensor]],
        defer: bool = False,
        above: Optional[int] = None,
    ) -> Tuple[TaskGradients, str]:
        """The first candidate that works (the graph is kept until one has)."""
        last_error: Optional[Exception] = None
        for mode in candidates:
            try:
                return run_path(mode, losses, graph, shared, tasks, True, self.factored, defer, above), mode
            except RuntimeError as error:  # vmap / custom Function limitations
                last_error = error
        raise RuntimeError("no gradient path succeeded") from last_error

    def _candidates(self, signature: Signature, rows_bytes: int, lean_native: bool) -> List[str]:
        paths = [m for m in MODES if self.factored or m != "lean"]
        if self.factored and rows_bytes > JACOBIAN_BUDGET:
            paths = [m for m in paths if m not in ("batched", "looped")]
        if lean_native:  # the paths that hold every factored layer's deltas would set the peak
            paths = [m for m in paths if m not in ("lean", "frontier")]
        history = self._history.get(signature)
        if not history:
            return paths
        best = min(min(v) for v in history.values())
        kept = [m for m in paths if m in history and min(history[m]) <= PRUNE * best]
        if not kept:  # what was measured is not a candidate any more (e.g. on an accumulated step)
            return paths
        return kept[::-1]  # the other order than last time: first-run costs fall on others

    def _measure(
        self,
        signature: Signature,
        losses: Sequence[Tensor],
        graph: LossGraph,
        shared: Sequence[Tensor],
        tasks: Sequence[Sequence[Tensor]],
        defer: bool,
        above: Optional[int] = None,
    ) -> TaskGradients:
        """Run every candidate path on this step, timed; use the first (in :data:`MODES`) that works.

        That path runs last, so only its result is alive when the step goes on (the
        others are dropped as soon as their Gram is taken): measuring costs time, not
        twice the memory. When ``native`` would keep only its factored layers' Gram
        (``defer``, :func:`._jacobian.defers`), the paths holding their deltas are not
        measured: the peak memory of the run is the point; a single candidate is not timed.
        On CUDA the device is synchronised around each timed path (:func:`_now`): its
        kernels run asynchronously, and a path's launch time is not its cost.
        """
        k = len(losses)
        rows_bytes = sum(k * p.numel() * p.element_size() for p in shared if graph.reached_by(p))
        lean_native = defer and self.factored and defers(graph, shared, k, above)
        candidates = self._candidates(signature, rows_bytes, lean_native)
        if len(candidates) == 1:
            try:
                result, mode = self._first(candidates, losses, graph, shared, tasks, defer, above)
            except RuntimeError:
                result, mode = self._first(FALLBACK, losses, graph, shared, tasks)
            if mode == "native" and not _engine_agrees(result, losses, graph, shared):
                warnings.warn(
                    "gradient_mode='auto': the 'native' path disagrees with autograd on this model "
                    "(a tensor hook inside the shared graph?); it is not used",
                    stacklevel=3,
                )
                result, mode = self._first(FALLBACK, losses, graph, shared, tasks)
            self.mode = mode
            self.propose(signature, mode)
            return result
        preferred = min(candidates, key=MODES.index)
        order = [m for m in candidates if m != preferred] + [preferred]
        grams: Dict[str, Tensor] = {}
        times: Dict[str, float] = {}
        last: Optional[TaskGradients] = None
        last_error: Optional[Exception] = None
        device = losses[0].device
        for mode in order:
            start = _now(device)
            try:
                result = run_path(mode, losses, graph, shared, tasks, True, self.factored, defer, above)
            except RuntimeError as error:
                last_error = error
                times[mode] = math.inf
                continue
            times[mode] = (_now(device) - start) * 1e3
            grams[mode] = result.grams([list(range(len(shared)))], k)[0]
            last = result if mode == preferred else None
            del result
        # the engine's own paths are the reference; the native walk cannot see tensor hooks
        engine_paths = [m for m in sorted(grams, key=MODES.index) if m != "native"]
        reference = grams[engine_paths[0]] if engine_paths else next(iter(grams.values()), None)
        for mode, gram in grams.items():
            if reference is not None and not _agrees(gram, reference):
                warnings.warn(
                    f"gradient_mode='auto': the {mode!r} path disagrees with the others on this model "
                    "(a tensor hook inside the shared graph?); it is not used",
                    stacklevel=3,
                )
                times[mode] = math.inf
        working = sorted((m for m, t in times.items() if math.isfinite(t)), key=MODES.index)
        if not working:
            raise RuntimeError("no gradient path succeeded") from last_error
        used = working[0]
        if used != preferred or last is None:  # the preferred path failed or disagreed: run the next one
            last = run_path(used, losses, graph, shared, tasks, True, self.factored, defer, above)
        self.mode = used
        self.timings = dict(times)
        self.propose(signature, used, times)
        return last


def _engine_agrees(
    result: TaskGradients, losses: Sequence[Tensor], graph: LossGraph, shared: Sequence[Tensor]
) -> bool:
    """Whether the native walk's Gram agrees with autograd's own backward (which runs tensor
    hooks; the walk does not): ``s^T G s`` against ``||grad of sum_i s_i L_i||^2`` for fixed
    random signs ``s``, from one ordinary backward (one parameter-sized buffer, not the
    paths that hold every task's deltas). A hook anywhere a task reaches changes the right
    side and not the left."""
    k = len(losses)
    reached = [n for n, p in enumerate(shared) if graph.reached_by(p)]
    if not reached:
        return True
    signs = torch.randint(0, 2, (k,), generator=torch.Generator().manual_seed(k)).double() * 2 - 1
    with torch.enable_grad():
        total = sum(loss * float(s) for loss, s in zip(losses, signs.tolist()) if loss.requires_grad)
        if not isinstance(total, Tensor):
            return True
        grads = torch.autograd.grad(total, [shared[n] for n in reached], retain_graph=True, allow_unused=True)
    norm = sum(float(g.double().square().sum()) for g in grads if g is not None)
    entry = float(signs @ result.grams([reached], k)[0] @ signs)
    if not (math.isfinite(norm) and math.isfinite(entry)):
        return True  # a non-finite step is skipped anyway; nothing to compare
    return abs(norm - entry) <= AGREEMENT * max(norm, entry, 1e-300)


def _agrees(gram: Tensor, reference: Tensor) -> bool:
    scale = float(reference.abs().max())
    if not math.isfinite(scale) or not bool(torch.isfinite(gram).all()):
        return True  # a non-finite step is skipped anyway; nothing to compare
    return float((gram - reference).abs().max()) <= AGREEMENT * scale


def _signature(losses: Sequence[Tensor], graph: LossGraph, shared: Sequence[Tensor]) -> Tuple[Signature, int]:
    """What a measured choice holds for, and the step's size (K x shared activation elements).

    The number of losses, which shared parameters each loss reaches, and the type and
    gradient shapes of every node of the shared graph (a new batch size, image size or
    sequence length is a new signature).
    """
    k = len(losses)
    shapes: List[object] = []
    work = 0
    mask = graph.mask
    for node in graph.order:
        if mask[node] & (mask[node] - 1) == 0:  # fewer than two losses: not shared
            continue
        sizes = tuple(tuple(m.shape) for m in getattr(node, "_input_metadata", ()))
        for size in sizes:
            work += math.prod(size)
        shapes.append((type(node).__name__, sizes))
    masks = tuple(graph.reached_by(p) for p in shared)
    return (k, masks, tuple(shapes)), work * k


# ---------------------------------------------------------------------- representation mode

#: Representation mode measures its head paths only when the dense rows would hold at
#: least this many elements (K x N x D); below, the rule decides.
HEADS_MEASURE_ABOVE = 1 << 22
#: Representation mode's head paths; ties go to the first.
HEAD_PATHS = ("factored", "dense")


class HeadPaths(Trials):
    """Representation mode's head path (:mod:`._representation`): ``"factored"`` or ``"dense"``.

    Where the heads allow both, ``gradient_mode="auto"`` times both (the rows, their
    Gram and one combination) on the first :data:`TRIALS` steps of a *signature* (K, the
    representation's shape, dtype and device, the heads' maps) and keeps the faster, as
    :class:`GradientEngine` does for the parameter-level paths: a measuring step uses
    the rule's rows, so its result does not depend on the timings; a choice is kept
    only when its step is taken (:meth:`commit`, :meth:`forget`); the checkpoint
    records it (:meth:`remembered`, :meth:`restore`). The rule
    (:func:`._representation.factored_is_cheaper`) decides where nothing is measured:
    steps below :data:`HEADS_MEASURE_ABOVE` and explicit gradient modes (``"lean"``:
    factored); dense rows beyond :data:`JACOBIAN_BUDGET` bytes are not built when the
    factored path exists.

    Args:
        measure: whether to measure (``gradient_mode="auto"``).
        lean: always factor where the heads allow it (``gradient_mode="lean"``).
    """

    def __init__(self, measure: bool = False, lean: bool = False) -> None:
        super().__init__(HEAD_PATHS)
        self.measure = measure
        self.lean = lean
        #: the path of the step computed last (None before any)
        self.path: Optional[str] = None
        #: ms per path measured on the step computed last (empty when it was not measured)
        self.timings: Dict[str, float] = {}

    def restore(self, path: Optional[str]) -> None:
        """Set a remembered choice (from a checkpoint): used for the next signature instead of measuring."""
        if path is not None and self.measure:
            self.restore_choice(path)

    def rows(
        self, losses: Sequence[Tensor], features: Tensor, tasks: Sequence[Sequence[Tensor]], graph: LossGraph
    ) -> TaskGradients:
        """The step's rows w.r.t. ``features`` by the chosen, measured or ruled path."""
        self.timings = {}
        self.forget()  # what a step that never reached its end proposed
        maps = head_maps(losses, features, graph)
        if maps is None:  # a head reads z other than through a linear map of its own
            self.path = "dense"
            return dense_rows(losses, features, tasks, graph)
        k = len(losses)
        rule = "factored" if self.lean or factored_is_cheaper(k, features, maps) else "dense"
        if not self.measure:
            self.path = rule
            return _head_path(rule, losses, features, tasks, graph, maps)
        signature: Signature = (
            k,
            tuple(features.shape),
            features.dtype,
            str(features.device),
            tuple((task, tuple(m.shape)) for task, _, m in maps),
        )
        chosen = self.chosen(signature)
        size = k * features.numel()
        if chosen is None and size * features.element_size() > JACOBIAN_BUDGET:
            chosen = "factored"  # the dense rows would set the run's peak memory
        elif chosen is None and size < HEADS_MEASURE_ABOVE:
            chosen = rule
        if chosen is None:
            return self._measure(signature, rule, losses, features, tasks, graph, maps)
        self.path = chosen
        self.propose(signature, chosen)
        return _head_path(chosen, losses, features, tasks, graph, maps)

    def _measure(
        self,
        signature: Signature,
        rule: str,
        losses: Sequence[Tensor],
        features: Tensor,
        tasks: Sequence[Sequence[Tensor]],
        graph: LossGraph,
        maps: List[HeadMap],
    ) -> TaskGradients:
        """Time both paths (rows, Gram, one combination); the rule's runs last and is used."""
        k = len(losses)
        ones = torch.ones(1, k, dtype=torch.float64)
        times: Dict[str, float] = {}
        for path in [p for p in HEAD_PATHS if p != rule] + [rule]:
            start = _now(features.device)
            result = _head_path(path, losses, features, tasks, graph, maps)
            result.grams([[0]], k)
            TaskGradients(result.shared[:1], [], result.factors).combine([[0]], ones)
            times[path] = (_now(features.device) - start) * 1e3
            if path != rule:
                del result  # dropped before the next path runs: only the used rows stay alive
        self.path = rule
        self.timings = times
        self.propose(signature, rule, times)
        return result


def _head_path(
    path: str,
    losses: Sequence[Tensor],
    features: Tensor,
    tasks: Sequence[Sequence[Tensor]],
    graph: LossGraph,
    maps: List[HeadMap],
) -> TaskGradients:
    if path == "factored":
        return factored_rows(losses, features, tasks, graph, maps)
    return dense_rows(losses, features, tasks, graph)


def _now(device: torch.device) -> float:
    """:data:`clock` once the device has finished its queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return clock()
