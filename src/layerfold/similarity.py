"""Similarity between layer representations, computed in float64.

- ``cosine``: mean over tokens of the cosine between two layers' token representations.
- ``angular``: 1 - arccos(cos)/pi on each sample's last token, averaged (Gromov et al. 2024,
  "The Unreasonable Ineffectiveness of the Deeper Layers").
- ``cka-linear``: centred kernel alignment with a linear kernel (Kornblith et al. 2019).
- ``cka-rbf``: CKA with a Gaussian kernel, bandwidth by the median heuristic, i.e. the
  alignment in a reproducing kernel Hilbert space used by SLM (arXiv 2502.19159, sec. 3).
Both CKAs use the unbiased HSIC estimator (Song et al. 2012); its value is kept as a float.

Inputs are ``[samples, tokens, hidden]`` tensors (or ``[n, hidden]`` token matrices).
"""

from __future__ import annotations

import math

import torch

from layerfold.registry import Registry

SIMILARITIES: Registry = Registry("similarity")


def _tokens(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).to(torch.float64)


def _subsample(n: int, max_tokens: int, seed: int = 0) -> torch.Tensor | None:
    if n <= max_tokens:
        return None
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=gen)[:max_tokens].sort().values


def hsic_unbiased(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC estimator (Song et al. 2012) of two n x n kernel matrices, n > 3."""
    n = k.shape[0]
    k = k.clone()
    l = l.clone()
    k.fill_diagonal_(0)
    l.fill_diagonal_(0)
    ones = torch.ones(n, 1, dtype=k.dtype, device=k.device)
    term1 = (k * l).sum()
    term2 = (ones.T @ k @ ones) * (ones.T @ l @ ones) / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * (ones.T @ k @ l @ ones)
    return ((term1 + term2 - term3) / (n * (n - 3))).squeeze()


def linear_kernel(x: torch.Tensor) -> torch.Tensor:
    return x @ x.T


def rbf_kernel(x: torch.Tensor) -> torch.Tensor:
    sq = torch.cdist(x, x).pow(2)
    # median over the pairs i < j: cdist's diagonal holds rounding noise (not always 0), which
    # a `sq > 0` filter let into the median, breaking the kernel's invariance to scale
    rows, cols = torch.triu_indices(x.shape[0], x.shape[0], offset=1, device=x.device)
    pairs = sq[rows, cols]
    median = pairs.median() if pairs.numel() else torch.tensor(0.0, dtype=x.dtype)
    median = median if median > 0 else torch.tensor(1.0, dtype=x.dtype, device=x.device)
    return torch.exp(-sq / (2 * median))  # 2 sigma^2 = 2 x median squared distance


def cka_from_kernels(k: torch.Tensor, l: torch.Tensor) -> float:
    xy = hsic_unbiased(k, l)
    xx = hsic_unbiased(k, k)
    yy = hsic_unbiased(l, l)
    denom = torch.sqrt(xx.clamp_min(0) * yy.clamp_min(0))
    return float(xy / denom) if denom > 0 else 0.0


@SIMILARITIES.register("cka-linear")
def cka_linear(x: torch.Tensor, y: torch.Tensor, max_tokens: int = 2048) -> float:
    x, y = _tokens(x), _tokens(y)
    idx = _subsample(x.shape[0], max_tokens)
    if idx is not None:
        x, y = x[idx], y[idx]
    return cka_from_kernels(linear_kernel(x), linear_kernel(y))


@SIMILARITIES.register("cka-rbf")
def cka_rbf(x: torch.Tensor, y: torch.Tensor, max_tokens: int = 2048) -> float:
    """Gaussian kernel exp(-d^2 / (2 sigma^2)), sigma^2 the median squared pairwise distance
    (the median heuristic)."""
    x, y = _tokens(x), _tokens(y)
    idx = _subsample(x.shape[0], max_tokens)
    if idx is not None:
        x, y = x[idx], y[idx]
    return cka_from_kernels(rbf_kernel(x), rbf_kernel(y))


@SIMILARITIES.register("cosine")
def cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(_tokens(x), _tokens(y), dim=-1).mean())


@SIMILARITIES.register("angular")
def angular_similarity(x: torch.Tensor, y: torch.Tensor) -> float:
    """1 - angular distance of the last tokens (Gromov et al. 2024), averaged over samples."""
    xl = x[..., -1, :].reshape(-1, x.shape[-1]).to(torch.float64) if x.dim() == 3 else _tokens(x)
    yl = y[..., -1, :].reshape(-1, y.shape[-1]).to(torch.float64) if y.dim() == 3 else _tokens(y)
    cos = torch.nn.functional.cosine_similarity(xl, yl, dim=-1).clamp(-1, 1)
    return float(1 - (torch.arccos(cos) / math.pi).mean())


def sample_cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    """Cosine between each sample's flattened representation, averaged over samples
    (the SLM authors' output criterion)."""
    xf = x.reshape(x.shape[0], -1).to(torch.float64)
    yf = y.reshape(y.shape[0], -1).to(torch.float64)
    return float(torch.nn.functional.cosine_similarity(xf, yf, dim=-1).mean())


def similarity_matrix(outputs: list[torch.Tensor], kind: str) -> torch.Tensor:
    """Symmetric L x L matrix of ``kind`` similarity between the given layer outputs."""
    fn = SIMILARITIES.get(kind)
    n = len(outputs)
    mat = torch.eye(n, dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            mat[i, j] = mat[j, i] = fn(outputs[i], outputs[j])
    return mat
