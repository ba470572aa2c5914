"""Layer x layer similarity of a model's layer outputs on calibration text, saved as JSON, CSV
and heatmap PNGs (``layerfold analyze``).

The output of layer ``i`` is the hidden state after decoder layer ``i`` (before the final
norm), taken from a :class:`~layerfold.calibrate.LayerCache` captured once.

CKA and cosine matrices are not computed pair by pair: the pairwise functions of
:mod:`layerfold.similarity` rebuild both kernels for every pair (2 x L(L-1)/2 kernels). Here
each layer's kernel is built and U-centred once, and the unbiased HSIC of a pair is one inner
product, HSIC_1(K, L) = <U(K), U(L)> / (n (n - 3)) (Szekely and Rizzo 2014), which equals the
estimator of Song et al. (2012) used by :func:`layerfold.similarity.hsic_unbiased`.
Everything is computed in float64.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from layerfold.calibrate import LayerCache
from layerfold.data.tokens import CalibrationConfig
from layerfold.errors import LayerfoldError
from layerfold.methods.base import PlanContext, Target
from layerfold.models.load import LoadedModel, as_loaded
from layerfold.output import check_out, write_folder
from layerfold.plan import Plan, PlanResult, library_versions
from layerfold.similarity import SIMILARITIES, _subsample, _tokens, linear_kernel, rbf_kernel

DEFAULT_MEASURES = ("cka-linear", "cka-rbf", "cosine", "angular")
KERNELS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"cka-linear": linear_kernel, "cka-rbf": rbf_kernel}
CKA_MAX_TOKENS = 2048  # the default of the pairwise CKA functions, same token subsample
LABELS = {
    "cka-linear": "linear CKA",
    "cka-rbf": "RBF CKA (median bandwidth)",
    "cosine": "mean token cosine",
    "angular": "angular similarity (last tokens)",
}
JSON_FILE = "analysis.json"
COSINE_EPS = 1e-8  # as torch.nn.functional.cosine_similarity


def u_centre(kernel: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """The U-centred kernel (Szekely and Rizzo 2014): zero diagonal, rows and columns centred
    so that <U(K), U(L)> / (n (n - 3)) is the unbiased HSIC of K and L. ``inplace`` reuses
    ``kernel``'s memory (it must then be float64)."""
    n = kernel.shape[0]
    k = kernel if inplace else kernel.to(torch.float64).clone()
    k.fill_diagonal_(0)
    rows = k.sum(1, keepdim=True) / (n - 2)
    cols = k.sum(0, keepdim=True) / (n - 2)
    total = k.sum() / ((n - 1) * (n - 2))
    k.sub_(rows).sub_(cols).add_(total)
    k.fill_diagonal_(0)
    return k


def gram_of_features(outputs: Sequence[torch.Tensor], feature: Callable[[torch.Tensor], torch.Tensor],
                     desc: str = "layers", progress: bool = False) -> torch.Tensor:
    """L x L inner products of one flat float64 feature vector per layer output, each feature
    computed once (the features are kept: L x feature-size float64 in memory)."""
    count = len(outputs)
    rows: torch.Tensor | None = None
    gram = torch.zeros(count, count, dtype=torch.float64)
    for i, out in enumerate(tqdm(outputs, desc=desc, disable=not progress, leave=False)):
        vector = feature(out).reshape(-1)
        if rows is None:
            rows = torch.empty(count, vector.numel(), dtype=torch.float64)
        rows[i] = vector
        dots = rows[: i + 1] @ vector
        gram[i, : i + 1] = dots
        gram[: i + 1, i] = dots
    return gram


def cka_matrix(outputs: Sequence[torch.Tensor], kind: str, max_tokens: int = CKA_MAX_TOKENS,
               progress: bool = False) -> torch.Tensor:
    """L x L CKA matrix (``kind`` ``cka-linear`` or ``cka-rbf``), equal to
    ``similarity_matrix(outputs, kind)`` (same token subsample) but building each layer's
    kernel once."""
    kernel = KERNELS[kind]
    n_tokens = _tokens(outputs[0]).shape[0]
    if n_tokens < 4:
        raise LayerfoldError(f"CKA needs at least 4 tokens, the calibration set has {n_tokens}")
    idx = _subsample(n_tokens, max_tokens)

    def feature(out: torch.Tensor) -> torch.Tensor:
        x = _tokens(out)
        return u_centre(kernel(x if idx is None else x[idx]).to(torch.float64), inplace=True)

    gram = gram_of_features(outputs, feature, desc=f"{kind} kernels", progress=progress)
    norms = gram.diagonal().clamp_min(0).sqrt()
    denom = torch.outer(norms, norms)
    matrix = torch.where(denom > 0, gram / denom.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    matrix.fill_diagonal_(1.0)
    return matrix


def cosine_matrix(outputs: Sequence[torch.Tensor], progress: bool = False) -> torch.Tensor:
    """L x L mean token cosine, equal to ``similarity_matrix(outputs, "cosine")``: the mean of
    the token cosines is the inner product of the row-normalised token matrices over n."""
    n_tokens = _tokens(outputs[0]).shape[0]

    def feature(out: torch.Tensor) -> torch.Tensor:
        x = _tokens(out)
        return x / x.norm(dim=-1, keepdim=True).clamp_min(COSINE_EPS)

    matrix = gram_of_features(outputs, feature, desc="cosine layers", progress=progress) / n_tokens
    matrix.fill_diagonal_(1.0)
    return matrix


def pairwise_matrix(outputs: Sequence[torch.Tensor], kind: str, progress: bool = False) -> torch.Tensor:
    """L x L matrix of a registered similarity, one call per pair."""
    fn = SIMILARITIES.get(kind)
    count = len(outputs)
    matrix = torch.eye(count, dtype=torch.float64)
    pairs = [(i, j) for i in range(count) for j in range(i + 1, count)]
    for i, j in tqdm(pairs, desc=f"{kind} pairs", disable=not progress, leave=False):
        matrix[i, j] = matrix[j, i] = fn(outputs[i], outputs[j])
    return matrix


def layer_similarity(outputs: Sequence[torch.Tensor], kind: str, progress: bool = False) -> torch.Tensor:
    """L x L ``kind`` similarity between layer outputs; CKA and cosine by the per-layer fast
    paths, any other registered measure pair by pair."""
    if kind in KERNELS:
        return cka_matrix(outputs, kind, progress=progress)
    if kind == "cosine":
        return cosine_matrix(outputs, progress=progress)
    return pairwise_matrix(outputs, kind, progress=progress)


def resolve_measures(measures: Sequence[str] | str) -> tuple[str, ...]:
    """Split a comma-separated list, drop repeats, check every name is a registered similarity."""
    names = measures.split(",") if isinstance(measures, str) else list(measures)
    kinds = tuple(dict.fromkeys(n.strip() for n in names if n.strip()))
    if not kinds:
        raise LayerfoldError(f"no measure given: choose among {', '.join(SIMILARITIES.names())}")
    for kind in kinds:
        SIMILARITIES.get(kind)  # raises "did you mean"
    return kinds


def analyze(model: LoadedModel | torch.nn.Module | str | None, out: str | Path,
            measures: Sequence[str] | str = DEFAULT_MEASURES, calibration: CalibrationConfig | None = None,
            plan: str | Path | Plan | PlanResult | None = None, *, overwrite: bool = False,
            tokens: torch.Tensor | None = None, progress: bool = True, max_gpu_memory: str | int | None = None,
            compute_device: str | torch.device | None = None) -> dict:
    """Similarity matrices between all layer outputs for each measure, written to ``out`` as
    ``analysis.json``, ``<measure>.csv`` and ``<measure>.png`` (with the plan's windows outlined
    when a plan is given). ``tokens`` ([N, T] ids) replaces the calibration text.
    ``max_gpu_memory`` streams the layers through the GPU for the capture (see
    :func:`layerfold.api.make_plan`).

    Returns the JSON record (matrices as nested lists), with ``out`` and ``files`` added.
    """
    start = time.perf_counter()
    kinds = resolve_measures(measures)
    out = Path(out).expanduser().resolve()
    check_out(out, overwrite)
    if tokens is not None and tokens.dim() != 2:
        raise LayerfoldError(f"tokens must be [samples, tokens] ids, got shape {tuple(tokens.shape)}")
    loaded = as_loaded(model)
    from layerfold.streaming import streaming_for

    calibration = calibration or CalibrationConfig()
    with streaming_for(loaded, max_gpu_memory, compute_device, calibration, tokens) as streamer:
        ctx = PlanContext(loaded=loaded, calibration=calibration, target=Target(), progress=progress,
                          tokens_override=tokens, streamer=streamer)
        the_plan = read_plan(plan, ctx.num_layers)
        seconds: dict[str, float] = {}
        tick = time.perf_counter()
        outputs = layer_outputs(ctx.cache)
        seconds["capture"] = time.perf_counter() - tick
    matrices: dict[str, torch.Tensor] = {}
    for kind in tqdm(kinds, desc="measures", disable=not progress):
        tick = time.perf_counter()
        matrices[kind] = layer_similarity(outputs, kind, progress=progress)
        seconds[kind] = time.perf_counter() - tick
    seconds["before_writing"] = time.perf_counter() - start
    record = _record(ctx, matrices, the_plan, given_tokens=tokens is not None)
    record["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    files = write_folder(out, overwrite, lambda folder: _write_files(folder, record, matrices, the_plan))
    record["seconds"]["total"] = round(time.perf_counter() - start, 3)
    return {**record, "out": str(out), "files": files}


def layer_outputs(cache: LayerCache) -> list[torch.Tensor]:
    return [cache.output(i) for i in range(cache.num_layers)]


def read_plan(plan: str | Path | Plan | PlanResult | None, num_layers: int) -> Plan | None:
    if plan is None:
        return None
    if isinstance(plan, PlanResult):
        plan = plan.plan
    elif not isinstance(plan, Plan):
        plan = Plan.load(plan)
    if plan.num_layers != num_layers:
        raise LayerfoldError(f"plan is for {plan.num_layers} layers, the model has {num_layers}")
    return plan


def _record(ctx: PlanContext, matrices: dict[str, torch.Tensor], plan: Plan | None, given_tokens: bool) -> dict:
    n_tokens = int(ctx.tokens.numel())
    calibration = ctx.calibration_record()
    if given_tokens:
        calibration = {"source": "given tokens", "samples": int(ctx.tokens.shape[0]),
                       "seq_len": int(ctx.tokens.shape[1]), "tokens_sha256_16": calibration["tokens_sha256_16"]}
    measures = {}
    for kind, matrix in matrices.items():
        entry = {"label": LABELS.get(kind, kind), "matrix": matrix.tolist(),
                 "adjacent": [float(matrix[i, i + 1]) for i in range(matrix.shape[0] - 1)]}
        if kind in KERNELS:
            entry["tokens_used"] = min(n_tokens, CKA_MAX_TOKENS)
        measures[kind] = entry
    return {"model": ctx.loaded.source, "architecture": ctx.loaded.arch.name, "num_layers": ctx.num_layers,
            "layers": "row/column i: hidden states output by decoder layer i (before the final norm)",
            "tokens": n_tokens, "calibration": calibration, "measures": measures,
            "plan": None if plan is None else {"summary": plan.summary(), "operations": plan.to_dict()["operations"]},
            "versions": library_versions()}


def _write_files(folder: Path, record: dict, matrices: dict[str, torch.Tensor], plan: Plan | None) -> list[str]:
    from layerfold.report.heatmap import save_heatmap

    names = [JSON_FILE]
    (folder / JSON_FILE).write_text(json.dumps(record, indent=2) + "\n")
    model = Path(str(record["model"])).name
    for kind, matrix in matrices.items():
        write_csv(matrix, folder / f"{kind}.csv")
        title = (f"{model}: {LABELS.get(kind, kind)} between layer outputs\n"
                 f"{record['tokens']} tokens of {record['calibration']['source']}")
        save_heatmap(matrix.numpy(), folder / f"{kind}.png", title, plan=plan, colorbar_label=kind)
        names += [f"{kind}.csv", f"{kind}.png"]
    if plan is not None:
        plan.save(folder / "plan.json")
        names.append("plan.json")
    return names


def write_csv(matrix: torch.Tensor, path: Path) -> None:
    """Header ``layer,0,1,...``; one row per layer, full float precision."""
    count = matrix.shape[0]
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["layer", *range(count)])
        for i, row in enumerate(matrix.tolist()):
            writer.writerow([i, *(repr(float(v)) for v in row)])
