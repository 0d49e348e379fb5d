"""ZCA whitening fitted on the training images (regularised, as in KIP / MTT)."""
from __future__ import annotations

import torch

from ..errors import ConfigError, DataError

_CHUNK = 4096  # rows per matmul: bounds the float64 temporaries for large sets


class ZCA:
    """x -> (flatten(x) - mean) @ W, W = U diag(1/sqrt(S + reg)) U^T from the train covariance."""

    def __init__(self):
        self.mean = self.whiten = self.unwhiten = None
        self.regularization = None
        self.shape = None  # (C, H, W) the transform was fitted on

    def fit(self, x: torch.Tensor, regularization: float = 0.1) -> "ZCA":
        if x.dim() != 4 or x.shape[0] < 2:
            raise DataError(f"ZCA.fit expects images [N,C,H,W] with N >= 2, got shape {tuple(x.shape)}")
        if not regularization >= 0:
            raise ConfigError(f"ZCA regularization must be >= 0, got {regularization!r}")
        flat = x.reshape(x.shape[0], -1)
        mean = flat.mean(0, dtype=torch.float64)
        cov = torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float64, device=x.device)
        for i in range(0, flat.shape[0], _CHUNK):
            c = flat[i:i + _CHUNK].double() - mean
            cov.addmm_(c.T, c)
        cov /= flat.shape[0] - 1
        S, U = torch.linalg.eigh(cov)
        S = S.clamp_min(0) + regularization  # eigh may return tiny negative eigenvalues
        if (S <= 0).any():
            raise DataError("ZCA covariance is singular and regularization is 0: expected regularization > 0")
        self.whiten = ((U * S.rsqrt()) @ U.T).float().cpu()
        self.unwhiten = ((U * S.sqrt()) @ U.T).float().cpu()
        self.mean = mean.float().cpu()
        self.regularization = float(regularization)
        self.shape = tuple(x.shape[1:])
        return self

    def _apply(self, x: torch.Tensor, matrix: torch.Tensor, forward: bool) -> torch.Tensor:
        if self.mean is None:
            raise DataError("ZCA is not fitted: call fit() or from_state_dict() first")
        if tuple(x.shape[-3:]) != self.shape:
            raise DataError(f"ZCA was fitted on images {self.shape}, got shape {tuple(x.shape)}")
        flat = x.reshape(-1, self.mean.numel())
        m, mean = matrix.to(x.device, flat.dtype), self.mean.to(x.device, flat.dtype)
        # Chunks keep peak memory to one extra block rather than a copy of the whole set.
        out = torch.cat([((b - mean) @ m) if forward else (b @ m + mean) for b in flat.split(_CHUNK)]) \
            if flat.shape[0] else flat.clone()
        return out.reshape(x.shape)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return self._apply(x, self.whiten, True)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        return self._apply(x, self.unwhiten, False)

    def state_dict(self) -> dict:
        return {"mean": self.mean, "whiten": self.whiten, "unwhiten": self.unwhiten,
                "regularization": self.regularization, "shape": list(self.shape)}

    @classmethod
    def from_state_dict(cls, state: dict) -> "ZCA":
        try:
            z = cls()
            z.mean, z.whiten, z.unwhiten = state["mean"], state["whiten"], state["unwhiten"]
            z.regularization, z.shape = float(state["regularization"]), tuple(state["shape"])
        except (KeyError, TypeError) as e:
            raise DataError(f"ZCA state is malformed (missing {e}): expected the dict from ZCA.state_dict()") from None
        d = z.mean.numel()
        if z.whiten.shape != (d, d) or z.unwhiten.shape != (d, d):
            raise DataError(f"ZCA state is malformed: expected {d}x{d} matrices for a mean of {d} values")
        return z
