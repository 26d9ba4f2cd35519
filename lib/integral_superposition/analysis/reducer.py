"""2-D maps of latents: PCA (scikit-learn) or UMAP (umap-learn, the ``viz`` extra).

Both are deterministic for a given ``random_state``. UMAP is optional: ``method="auto"``
uses it when installed and falls back to PCA with a logged message; ``method="umap"``
without umap-learn raises an ImportError that says how to install it.

Inputs are either decoder rows (``[K, d]``, unit-normalised so that the map reflects
direction, not scale) or latent profiles such as per-label log odds (``[K, C]``).
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from typing import Any, Protocol

import numpy as np
import torch
from sklearn.decomposition import PCA

log = logging.getLogger(__name__)

__all__ = [
    "HAS_UMAP",
    "PCAReducer",
    "Reducer2D",
    "UMAPReducer",
    "create_reducer",
    "decoder_directions",
    "reduce_2d",
]


# find_spec, not import: importing umap compiles numba code and takes seconds
HAS_UMAP = importlib.util.find_spec("umap") is not None


class Reducer2D(Protocol):
    """What a reducer offers: ``fit(X) -> self`` and ``transform(X) -> [N, n_components]``."""

    def fit(self, X: np.ndarray) -> Reducer2D: ...

    def transform(self, X: np.ndarray) -> np.ndarray: ...


class PCAReducer:
    """PCA to ``n_components`` dimensions (scikit-learn, full SVD with its deterministic sign flip)."""

    def __init__(self, n_components: int = 2, random_state: int = 42):
        self.n_components = n_components
        self.random_state = random_state
        self.pca: PCA | None = None

    def fit(self, X: np.ndarray) -> PCAReducer:
        X = _check_matrix(X, self.n_components)
        self.pca = PCA(
            n_components=self.n_components, random_state=self.random_state, svd_solver="full"
        )
        self.pca.fit(X)
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        if self.pca is None:
            raise ValueError("PCAReducer: call fit() before transform()")
        return self.pca.transform(np.asarray(X, dtype=np.float64))

    def fit_transform(self, X: np.ndarray) -> np.ndarray:
        return self.fit(X).transform(X)


class UMAPReducer:
    """UMAP to ``n_components`` dimensions (umap-learn). With ``random_state`` set it is
    deterministic (and single-threaded, which is how umap-learn guarantees it)."""

    def __init__(
        self,
        n_components: int = 2,
        random_state: int = 42,
        n_neighbors: int = 15,
        min_dist: float = 0.1,
        metric: str = "cosine",
    ):
        if not HAS_UMAP:
            raise ImportError(
                "UMAP needs umap-learn, which is not installed: pip install 'integral-superposition[viz]' "
                "(or use method='pca')"
            )
        self.n_components = n_components
        self.random_state = random_state
        self.n_neighbors = n_neighbors
        self.min_dist = min_dist
        self.metric = metric
        self.umap_model: Any = None

    def fit(self, X: np.ndarray) -> UMAPReducer:
        import umap

        X = _check_matrix(X, self.n_components)
        n_neighbors = int(min(self.n_neighbors, max(2, X.shape[0] - 1)))
        self.umap_model = umap.UMAP(
            n_components=self.n_components,
            random_state=self.random_state,
            n_neighbors=n_neighbors,
            min_dist=self.min_dist,
            metric=self.metric,
            init="spectral" if X.shape[0] > self.n_components + 2 else "random",
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*n_jobs value.*")
            warnings.filterwarnings("ignore", message=".*k >= N.*")
            self.umap_model.fit(X)
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        if self.umap_model is None:
            raise ValueError("UMAPReducer: call fit() before transform()")
        return self.umap_model.transform(np.asarray(X, dtype=np.float32))

    def fit_transform(self, X: np.ndarray) -> np.ndarray:
        self.fit(X)
        return np.asarray(self.umap_model.embedding_, dtype=np.float64)


def _check_matrix(X: np.ndarray, n_components: int) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"X has shape {X.shape}: expected [n_points, n_features]")
    if X.shape[0] < n_components + 1:
        raise ValueError(
            f"X has {X.shape[0]} points: a {n_components}-D map needs at least {n_components + 1}"
        )
    if not np.isfinite(X).all():
        raise ValueError("X contains NaN or inf: replace them (e.g. np.nan_to_num) before reducing")
    return X


def create_reducer(
    method: str = "pca", n_components: int = 2, random_state: int = 42, **kwargs: Any
) -> Reducer2D:
    """A reducer by name: ``"pca"``, ``"umap"``, or ``"auto"`` (UMAP when installed, else PCA)."""
    if method == "auto":
        if not HAS_UMAP:
            log.info("umap-learn is not installed: using PCA for the 2-D map")
        method = "umap" if HAS_UMAP else "pca"
    if method == "pca":
        return PCAReducer(n_components, random_state)
    if method == "umap":
        return UMAPReducer(n_components, random_state, **kwargs)
    raise ValueError(f"method={method!r}: expected 'pca', 'umap' or 'auto'")


def decoder_directions(W_dec: torch.Tensor | np.ndarray) -> np.ndarray:
    """Unit-normalised decoder rows ``[K, d]`` (float64)."""
    W = torch.as_tensor(W_dec).detach().double().cpu().numpy()
    return W / np.maximum(np.linalg.norm(W, axis=1, keepdims=True), 1e-12)


def reduce_2d(
    X: np.ndarray, method: str = "auto", random_state: int = 0, **kwargs: Any
) -> tuple[np.ndarray, str]:
    """Fit a 2-D reducer on ``X [N, F]`` and return ``(coords [N, 2], method used)``."""
    reducer = create_reducer(method, 2, random_state, **kwargs)
    used = "umap" if isinstance(reducer, UMAPReducer) else "pca"
    return np.asarray(reducer.fit_transform(X), dtype=np.float64), used
