"""The closed-form weight updates of ROME, MEMIT, EMMET and AlphaEdit, in float64 numpy.

Notation (REFERENCE.md): W [out, in] an MLP output projection, K [in, n] the keys of n edits,
R [out, n] the wanted change of the outputs W k_i (+ b), C the keys' second moment E[k k^T] of
plain text, given as a `CovSolver` (C + ridge I). Each function returns dW [out, in].

* `emmet_delta` (EMMET, Gupta et al. 2024): min tr(dW C dW^T) subject to dW K = R, so
  dW = R D^-1 (C^-1 K)^T with D = K^T C^-1 K (+ `lam` I, EMMET's emmet_lambda, which relaxes the
  equality). With n = 1 and lam = 0 this is ROME's rank-one update
  (R u^T / (u^T k), u = C^-1 k): r-ROME uses it.
* `memit_delta` (MEMIT, Meng et al. 2023): least squares,
  min lam |dW C^1/2|^2 + |dW K - R|^2, so dW = R K^T (lam C + K K^T)^-1 (MEMIT's
  mom2_update_weight = lam).
* `alphaedit_delta` (AlphaEdit, Fang et al. 2025): with P the projection on the near-null space
  of C and Kp Kp^T the keys of earlier edits, dW = R K^T P ((K K^T + Kp Kp^T) P + l2 I)^-1;
  its rows lie in range(P), so dW k0 ~ 0 for any key k0 that plain text produces.
"""

from __future__ import annotations

import numpy as np

from salem_jax.baselines.keystats import CovSolver


def _check(K: np.ndarray, R: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    K, R = np.asarray(K, np.float64), np.asarray(R, np.float64)
    if K.ndim != 2 or R.ndim != 2 or K.shape[1] != R.shape[1]:
        raise ValueError(f"need K [in, n] and R [out, n]; got {K.shape} and {R.shape}")
    if K.shape[0] != d:
        raise ValueError(f"keys have {K.shape[0]} dims, the covariance {d}")
    return K, R


def emmet_delta(K: np.ndarray, R: np.ndarray, solver: CovSolver, lam: float = 0.0) -> np.ndarray:
    """EMMET's equality-constrained update (see the module docstring)  [out, in]."""
    K, R = _check(K, R, solver.dim)
    cik = solver.solve(K)  # [in, n]
    D = K.T @ cik + lam * np.eye(K.shape[1])
    try:
        X = np.linalg.solve(D, R.T)  # [n, out]
    except np.linalg.LinAlgError:
        X = np.linalg.pinv(D) @ R.T  # EMMET's code falls back to pinv (e.g. two identical keys)
    return X.T @ cik.T


def memit_delta(K: np.ndarray, R: np.ndarray, solver: CovSolver, lam: float) -> np.ndarray:
    """MEMIT's least-squares update dW = R K^T (lam C + K K^T)^-1  [out, in]."""
    K, R = _check(K, R, solver.dim)
    A = lam * solver.matrix() + K @ K.T
    return np.linalg.solve(A, K @ R.T).T  # A symmetric


def alphaedit_delta(K: np.ndarray, R: np.ndarray, P: np.ndarray, prior: np.ndarray | None, l2: float) -> np.ndarray:
    """AlphaEdit's null-space update dW = R K^T P ((K K^T + prior) P + l2 I)^-1  [out, in]
    (prior = the sum of k k^T over earlier edits' keys, or None)."""
    K, R = _check(K, R, P.shape[0])
    KK = K @ K.T + (0.0 if prior is None else prior)
    A = P @ KK + l2 * np.eye(P.shape[0])  # the transpose of (KK P + l2 I), P and KK symmetric
    return np.linalg.solve(A, P @ K @ R.T).T
