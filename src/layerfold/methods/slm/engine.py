"""The SLM engine: scores candidate windows on captured layer inputs, incrementally.

Layer inputs are captured once (:mod:`layerfold.calibrate`); a candidate window is scored by
building one fused layer and running only the layers from the window upwards; candidate scores
are memoised, so a target-size search over thresholds re-runs almost nothing.  The sliding loop
takes exactly the decisions of a naive loop that deep-copies the model and runs it whole for
every candidate (tests/authors_loop.py), under either rule of :class:`SlidingLoop`.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from typing import Literal

import torch
from tqdm.auto import tqdm

from layerfold.calibrate import LayerCache
from layerfold.errors import LayerfoldError
from layerfold.merge import build_fused_layer, scale_branches
from layerfold.methods._common import calibration_loss, output_kls
from layerfold.similarity import sample_cosine, similarity_matrix

CRITERIA = ("output-cosine", "cka-linear", "cka-rbf", "angular", "loss")
CHANNEL_RIDGE = 3.0  # pull of the per-channel factors towards 1 (chosen on PTB-valid: benchmarks/studies/channel_fit)
Window = tuple[int, int]
Rescale = Literal["channels", "none"]


@dataclass(frozen=True)
class SlidingLoop:
    """The details of the sliding loop on which the paper's text and the authors' code differ.

    ``keep_top``: how many of the top layers no window may contain; the loop's first candidate is
    the pair just below them (0: the last pair, so the last layer may be merged; the authors' code
    keeps 1).  ``strict``: a candidate passes when its similarity is greater than the threshold
    (the authors' code) rather than greater or equal.  ``keep_pending``: when the loop reaches
    layer 0 with a window still growing, that window is fused (False: it is dropped, as the
    authors' code does).  A target size stops the loop as soon as the size is reached, and the
    window that reached it is always fused."""

    keep_top: int = 0
    strict: bool = False
    keep_pending: bool = True

    def passes(self, similarity: float, threshold: float) -> bool:
        return similarity > threshold if self.strict else similarity >= threshold


PAPER_LOOP = SlidingLoop()
AUTHORS_LOOP = SlidingLoop(keep_top=1, strict=True, keep_pending=False)


def removed_layers(windows: list[Window]) -> set[int]:
    """Layers a base merge drops: all but each window's base layer."""
    return {i for lo, hi in windows for i in range(lo + 1, hi + 1)}


def windows_of(removed: set[int]) -> list[Window]:
    """Windows (base layer first) that drop exactly ``removed`` (layer 0 never in it)."""
    windows: list[Window] = []
    for i in sorted(removed):
        if windows and windows[-1][1] == i - 1:
            windows[-1] = (windows[-1][0], i)
        else:
            windows.append((i - 1, i))
    return windows


def _token_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-token cosine in float64; two identical vectors count as 1 even when both are zero."""
    a, b = a.double(), b.double()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return torch.where((a == b).all(dim=-1), torch.ones_like(cos), cos).flatten()


@dataclass
class SlmRun:
    windows: list[Window]
    scores: dict[Window, float]
    rejected: dict[Window, float] = field(default_factory=dict)

    @property
    def removed(self) -> int:
        return sum(hi - lo for lo, hi in self.windows)


class SlmEngine:
    """Scores candidate windows; memoises by (committed windows, candidate)."""

    def __init__(self, cache: LayerCache, criterion: str, merge: str, norms: str) -> None:
        if criterion not in CRITERIA:
            from layerfold.errors import did_you_mean

            raise did_you_mean(criterion, CRITERIA, "criterion")
        self.cache = cache
        self.criterion = criterion
        self.merge, self.norms = merge, norms
        self.memo: dict[tuple, float] = {}
        self._fused: dict[Window, torch.nn.Module] = {}
        self._reference: torch.Tensor | None = None
        self._matrix: torch.Tensor | None = None
        self.evaluated = 0
        self.seen: set[float] = set()

    @property
    def num_layers(self) -> int:
        return self.cache.num_layers

    def candidate(self, window: Window) -> torch.nn.Module:
        """A fused layer for scoring only: reused if already built, else built and not kept,
        so that memory holds the weights plus the committed fused layers plus one."""
        return self._fused[window] if window in self._fused else self.build(window)

    def fused(self, window: Window) -> torch.nn.Module:
        """A fused layer that stays (committed windows)."""
        if window not in self._fused:
            self._fused[window] = self.build(window)
        return self._fused[window]

    def retain(self, windows) -> None:
        """Forget the fused layers of windows not in ``windows`` (rebuilt if needed again), so that
        memory holds the weights plus the fused layers of the model being scored."""
        keep = set(windows)
        for window in [w for w in self._fused if w not in keep]:
            del self._fused[window]

    def build(self, window: Window) -> torch.nn.Module:
        lo, hi = window
        layers = self.cache.layers
        if self.merge == "base":
            return layers[lo]  # the base layer itself: its weights are the fused layer's, no copy needed
        return build_fused_layer([layers[i] for i in range(lo, hi + 1)], operator=self.merge, norms=self.norms)

    def output_is_cached(self) -> bool:
        """Whether a fused layer's output on the original activations is the cached output of
        the window's base layer (the fused layer is that layer, norms included)."""
        return self.merge == "base" and self.norms == "base"

    def reference_output(self) -> torch.Tensor:
        if self._reference is None:
            norm = self.cache.arch.final_norm_module(self.cache.model)
            with torch.no_grad():
                outs = [norm(h.to(self.cache.device)) for h in self.cache.inputs[self.num_layers]]
            self._reference = torch.cat(outs)
        return self._reference

    def stack_above(self, committed: tuple[Window, ...], start: int) -> list[tuple[torch.nn.Module, int]]:
        """Modules of the committed model from original index ``start`` upwards."""
        at = {lo: (lo, hi) for lo, hi in committed}
        layers = self.cache.layers
        modules, i = [], start
        while i < self.num_layers:
            if i in at:
                modules.append((self.fused(at[i]), i))
                i = at[i][1] + 1
            else:
                modules.append((layers[i], i))
                i += 1
        return modules

    def similarity(self, committed: tuple[Window, ...], lo: int, hi: int) -> float:
        value = self._similarity(committed, lo, hi)
        self.seen.add(value)
        return value

    def _similarity(self, committed: tuple[Window, ...], lo: int, hi: int) -> float:
        if self.criterion != "output-cosine":
            return float(self.matrix()[hi, lo])
        key = (committed, lo, hi)
        if key not in self.memo:
            modules = [(self.candidate((lo, hi)), lo)] + self.stack_above(committed, hi + 1)
            out = torch.cat(self.cache.run(lo, modules, final_norm=True))
            self.memo[key] = sample_cosine(out, self.reference_output())
            self.evaluated += 1
        return self.memo[key]

    def matrix(self) -> torch.Tensor:
        """Similarity between layer outputs (output of layer i = input of layer i + 1)."""
        if self._matrix is None:
            kind = self.criterion
            outputs = [self.cache.output(i) for i in range(self.num_layers)]
            self._matrix = similarity_matrix(outputs, kind)
        return self._matrix

    def run(self, threshold: float, budget: int | None = None, loop: SlidingLoop = PAPER_LOOP) -> SlmRun:
        """The sliding loop at one threshold: from the top down, a window grows downwards while the
        candidate (the window fused, the windows above it already fused) passes the threshold; at
        the first that fails, the window is fused and the next starts just below it.  With
        ``budget``, stop once that many layers are gone.  ``loop`` settles the details on which
        the paper and the authors' code differ."""
        windows: list[Window] = []
        scores: dict[Window, float] = {}
        rejected: dict[Window, float] = {}
        last_ok: float | None = None
        high = self.num_layers - 1 - loop.keep_top
        low = high - 1
        reached = False  # the budget was reached
        self.retain(())  # another threshold commits other windows

        def commit(lo_: int, hi_: int) -> None:
            if hi_ > lo_:
                windows.append((lo_, hi_))
                scores[(lo_, hi_)] = last_ok if last_ok is not None else float("nan")

        while low >= 0:
            sim = self.similarity(tuple(windows), low, high)
            if loop.passes(sim, threshold):
                last_ok = sim
                low -= 1
            else:
                rejected[(low, high)] = sim
                commit(low + 1, high)
                last_ok = None
                high = low
                low = high - 1
            pending = high - low - 1  # layers the growing window [low + 1, high] removes
            if budget is not None and sum(h - lo_ for lo_, h in windows) + pending >= budget:
                reached = True
                break
        if reached or loop.keep_pending:
            commit(low + 1, high)
        return SlmRun(windows=windows, scores=scores, rejected=rejected)

    def module_of(self, segment: Window) -> torch.nn.Module:
        return self.cache.layers[segment[0]] if segment[0] == segment[1] else self.fused(segment)

    def score_output(self, outs: list[torch.Tensor]) -> float:
        """Higher is better: cosine with the original's final hidden states (``outs`` after the
        final norm), or minus the calibration LM loss (``outs`` before it)."""
        if self.criterion == "output-cosine":
            return sample_cosine(torch.cat(outs), self.reference_output())
        return -calibration_loss(self.cache, outs)

    # --- plans of removed layers (merge=base: a window keeps its base layer, the rest go) ---

    def score_removal(self, removed: set[int] | frozenset[int]) -> float:
        """The criterion (higher is better) for the model without the layers in ``removed``."""
        key = ("removal", frozenset(removed))
        if key not in self.memo:
            self.memo[key] = self.score_output(self._run_without(removed, final_norm=self.criterion == "output-cosine"))
            self.evaluated += 1
        return self.memo[key]

    def _run_without(self, removed: set[int] | frozenset[int], start: int | None = None,
                     hidden: list[torch.Tensor] | None = None, final_norm: bool = False) -> list[torch.Tensor]:
        """Last outputs of the model without the layers in ``removed``, run from position
        ``start`` (default: the first removed layer) on the original activations or ``hidden``."""
        if start is None:
            start = min(removed, default=self.num_layers)
        kept = [i for i in range(start, self.num_layers) if i not in removed]
        return self.cache.run(start, [(self.cache.layers[i], i) for i in kept], hidden=hidden, final_norm=final_norm)

    def window_cost(self, window: Window) -> float:
        """Local cost of fusing ``window``: 1 - cosine between the fused layer's output and the
        window's original output, per token, averaged; both on the original model's activations."""
        lo, hi = window
        if window not in self.memo:
            if self.output_is_cached():
                outs = self.cache.inputs[lo + 1]  # the fused layer is layer lo itself: its output is cached
            else:
                outs = self.cache.run(lo, [(self.candidate(window), lo)])
            target = self.cache.inputs[hi + 1]
            cos = [_token_cosine(o, t.to(o.device)) for o, t in zip(outs, target, strict=True)]
            self.memo[window] = float(1 - torch.cat(cos).mean())
            self.evaluated += 1
        return self.memo[window]

    def optimal(self, budget: int, max_window: int = 8, progress: bool = True) -> SlmRun:
        """Choose the non-overlapping windows that remove exactly ``budget`` layers with the
        least summed window cost, by dynamic programming over (layers seen, layers removed)."""
        n = self.num_layers
        k_max = max(2, min(max_window, budget + 1))
        windows = [(lo, lo + k - 1) for k in range(2, k_max + 1) for lo in range(n - k + 1)]
        costs = {w: self.window_cost(w) for w in tqdm(windows, desc="window costs", disable=not progress,
                                                        leave=False)}
        inf = float("inf")
        best = [[inf] * (budget + 1) for _ in range(n + 1)]  # best[i][r]: layers 0..i-1 done, r removed
        choice: list[list[Window | None]] = [[None] * (budget + 1) for _ in range(n + 1)]
        best[0][0] = 0.0
        for i in range(1, n + 1):
            for r in range(budget + 1):
                value, pick = best[i - 1][r], None
                for k in range(2, k_max + 1):
                    if k <= i and r >= k - 1:
                        candidate = best[i - k][r - k + 1] + costs[(i - k, i - 1)]
                        if candidate < value:
                            value, pick = candidate, (i - k, i - 1)
                best[i][r], choice[i][r] = value, pick
        if best[n][budget] == inf:
            raise LayerfoldError(f"cannot remove {budget} layers with windows of at most {k_max} layers; "
                                 "raise max_window")
        chosen, i, r = [], n, budget
        while i > 0:
            pick = choice[i][r]
            if pick is None:
                i -= 1
            else:
                chosen.append(pick)
                r -= pick[1] - pick[0]
                i = pick[0]
        return SlmRun(windows=sorted(chosen), scores={w: 1 - costs[w] for w in chosen})

    def _branches(self, option: str) -> dict[str, str]:
        branches = self.cache.arch.residual_branches
        if not branches:
            raise LayerfoldError(f"{option} is not available for {self.cache.arch.name}: its description has no "
                                 "residual_branches")
        return branches

    def _folded(self, windows: list[Window], modules: dict[int, torch.nn.Module] | None = None
                 ) -> list[tuple[torch.nn.Module, int]]:
        """The folded model's layers from the first window up, each with its original index: each
        window's fused layer (``modules[base]`` where given), the other kept layers as they are."""
        removed = removed_layers(windows)
        modules = {w[0]: self.module_of(w) for w in windows} | (modules or {})
        return [(modules.get(i, self.cache.layers[i]), i) for i in range(windows[0][0], self.num_layers)
                if i not in removed]

    @torch.no_grad()
    def fit_channels(self, windows: list[Window], ridge: float = CHANNEL_RIDGE,
                     progress: bool = True
                     ) -> tuple[dict[Window, dict[str, torch.Tensor]], dict[int, torch.nn.Module]]:
        """One factor per output channel of each residual branch of each window's fused layer,
        fitted in closed form on the calibration tokens.  Bottom-up, with the windows below
        already scaled: for channel ``c`` of the window ``[lo, hi]``, least squares over the
        tokens of ``y_c - h_c ~ sum_b s_b,c * f_b,c``, where ``h`` enters the fused layer in the
        pruned model, ``f_b`` is what branch ``b`` (attention, MLP) adds and ``y`` is the
        original model's residual stream after layer ``hi``; ridge ``ridge * sum_t f_b,c^2`` pulls
        each factor towards 1 (a channel a branch never writes keeps 1).  Returns, per window,
        branch path -> factors (float32, one per hidden channel), and the scaled layers (window
        base -> a scaled copy of its fused layer)."""
        from layerfold.models.arch import get_dotted

        branches = list(self._branches("channel fitting"))
        windows = sorted(windows)
        if not windows:
            return {}, {}
        start = windows[0][0]
        modules: dict[int, torch.nn.Module] = {}
        factors: dict[Window, dict[str, torch.Tensor]] = {}
        for lo, hi in tqdm(windows, desc="fitting channels", disable=not progress, leave=False):
            below = [(m, j) for m, j in self._folded(windows, modules) if j < lo]
            hidden = self.cache.run(start, below) if below else self.cache.inputs[lo]
            layer = copy.deepcopy(self.module_of((lo, hi)))
            seen: dict[str, list[torch.Tensor]] = {p: [] for p in branches}

            def keep(_module, _args, out, into):
                into.append(out.detach().to(self.cache.store_device, torch.float32))

            hooks = [get_dotted(layer, p).register_forward_hook(functools.partial(keep, into=seen[p]))
                     for p in branches]
            try:
                self.cache.run(lo, [(layer, lo)], hidden=hidden)
            finally:
                for hook in hooks:
                    hook.remove()
            gram = rhs = None
            for b, (h, y) in enumerate(zip(hidden, self.cache.inputs[hi + 1], strict=True)):
                width = y.shape[-1]
                f = torch.stack([seen[p][b].reshape(-1, width) for p in branches], -1).double()  # [tokens, H, k]
                d = (y.to(f) - h.to(f)).reshape(-1, width)
                g, r = torch.einsum("thi,thj->hij", f, f), torch.einsum("thi,th->hi", f, d)
                gram, rhs = (g, r) if gram is None else (gram + g, rhs + r)
            # solve for the change from 1, so that a silent channel (zero Gram) keeps factor 1
            diag = torch.diagonal(gram, dim1=-2, dim2=-1)
            lhs = gram + torch.diag_embed(ridge * diag + 1e-12 * diag.sum(-1, keepdim=True).clamp_min(1e-30))
            delta = torch.linalg.solve(lhs, (rhs - gram.sum(-1)).unsqueeze(-1)).squeeze(-1)
            scale = (1 + delta).round(decimals=6).float().cpu()  # as the plan stores them
            factors[(lo, hi)] = {p: scale[:, i].clone() for i, p in enumerate(branches)}
            scale_branches(layer, self.cache.arch.residual_branches, factors[(lo, hi)])
            modules[lo] = layer
            self.evaluated += 1
        return factors, modules

    def kl_of(self, windows: list[Window], modules: dict[int, torch.nn.Module] | None = None) -> float:
        """KL(original || pruned) on the calibration tokens of the model with ``windows`` folded,
        their fused layers replaced by ``modules`` (window base -> layer) where given."""
        return self.kls_of(windows, [modules])[0]

    def kls_of(self, windows: list[Window], variants: list[dict[int, torch.nn.Module] | None]) -> list[float]:
        """:meth:`kl_of` for each of ``variants`` (fused layers by window base; None: the base
        layers), the original's distributions made once for all."""
        windows = sorted(windows)
        if not windows:
            return [0.0] * len(variants)
        outputs = [self.cache.run(windows[0][0], self._folded(windows, modules)) for modules in variants]
        return output_kls(self.cache, outputs)

    def search(self, budget: int, progress: bool = True, loop: SlidingLoop = PAPER_LOOP) -> tuple[float, SlmRun]:
        """Highest threshold at which the budgeted loop removes exactly ``budget`` layers.

        The loop's decisions change only where the threshold crosses a similarity it compared
        against, so the search bisects over the similarities seen so far (each run adds the
        ones it met), and memoised candidates make repeated runs nearly free."""
        best_t, best = -1.0, self.run(-1.0, budget, loop)
        if best.removed != budget:
            kept = f" (the top {loop.keep_top} never merged)" if loop.keep_top else ""
            raise LayerfoldError(f"the sliding loop cannot remove {budget} of {self.num_layers} layers{kept}; "
                                 "ask for fewer")
        lo_t, hi_t = -1.0, float("inf")
        bar = tqdm(desc="threshold search", disable=not progress, leave=False)
        while True:
            values = sorted(v for v in self.seen if lo_t < v < hi_t)
            if not values:
                break
            mid = values[len(values) // 2]
            run = self.run(mid, budget, loop)
            bar.update(1)
            if run.removed == budget:
                lo_t, best_t, best = mid, mid, run
            else:
                hi_t = mid
        bar.close()
        return best_t, best
