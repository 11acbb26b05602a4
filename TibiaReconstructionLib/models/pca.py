"""PCA autoencoder on aligned canonical tensors, with a mask-robust (visible-voxel) encoder.

Vectors are the flattened (C, Z, Y, X) tensors, average-pooled by ``factor`` (1: none). ``encode``
projects onto the k principal axes; with ``visible`` it instead solves the probabilistic-PCA least
squares on the visible voxels only (ridge = noise variance / component variance; pooled visibility
fractions weight the voxels), so masked-out voxels do not bias the code. ``decode`` returns tensors on
the full grid (trilinear upsampling of the pooled reconstruction when ``factor`` > 1): a pooled model
is ``factor``³ times smaller at almost the same accuracy for smooth anatomy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import InputError
from .autoencoder import Autoencoder, masked_mse
from .config import ArchConfig


@dataclass
class PCAConfig(ArchConfig):
    in_channels: int = 2
    shape: list[int] = field(default_factory=lambda: [224, 64, 64])  # (Z, Y, X)
    components: int = 32
    factor: int = 1  # components live on the grid average-pooled by this factor


BONE_LEVEL = 0.05  # tensor values above this count as bone when estimating a case's residual variance


class PCA(Autoencoder):
    """Mean + k orthonormal components (k, D) with their variances and the residual noise variance."""

    kind = "pca"

    def __init__(self, config: PCAConfig | dict | None = None) -> None:
        super().__init__()
        cfg = config if isinstance(config, PCAConfig) else PCAConfig.from_dict(config or {})
        self.arch = cfg
        self.config = {"type": self.kind, **cfg.to_dict()}
        if cfg.factor < 1 or any(s % cfg.factor for s in cfg.shape):
            raise InputError(f"PCA pooling factor {cfg.factor} must be >= 1 and divide the grid shape {cfg.shape}.")
        self.coarse_shape = [s // cfg.factor for s in cfg.shape]
        d = cfg.in_channels * self.coarse_shape[0] * self.coarse_shape[1] * self.coarse_shape[2]
        self.register_buffer("mean", torch.zeros(d))
        self.register_buffer("components", torch.zeros(cfg.components, d))
        self.register_buffer("variances", torch.ones(cfg.components))
        self.register_buffer("noise_variance", torch.zeros(()))

    @torch.no_grad()
    def fit(self, n_cases: int, get_case: Callable[[int], torch.Tensor], chunk: int = 1 << 18) -> "PCA":
        """Fit on ``n_cases`` tensors ``get_case(i)`` (C, Z, Y, X) with the Gram-matrix SVD, in float64.

        Memory stays at one (n_cases, chunk) block besides the results.
        """
        k = self.arch.components
        if n_cases < 2 or k > n_cases - 1:
            raise InputError(f"PCA with {k} components needs at least {k + 1} training cases, got {n_cases}.")
        rows = torch.stack([self._pool(get_case(i).float()[None]).reshape(-1) for i in range(n_cases)])
        if rows.shape[1] != self.mean.numel():
            raise InputError(f"PCA expects cases of {self.arch.in_channels} channels x {self.arch.shape} voxels, got "
                             f"{rows.shape[1] * self.arch.factor ** 3} values.")
        mean = rows.double().mean(0)
        gram = torch.zeros(n_cases, n_cases, dtype=torch.float64)
        for a in range(0, rows.shape[1], chunk):
            block = rows[:, a:a + chunk].double() - mean[a:a + chunk]
            gram += block @ block.T
        evals, evecs = torch.linalg.eigh(gram)
        evals, evecs = evals.flip(0).clamp_min(0.0), evecs.flip(1)
        comps = torch.zeros(k, rows.shape[1])
        for a in range(0, rows.shape[1], chunk):
            block = rows[:, a:a + chunk].double() - mean[a:a + chunk]
            comps[:, a:a + chunk] = (evecs[:, :k].T @ block / evals[:k].sqrt().clamp_min(1e-12)[:, None]).float()
        self.mean.copy_(mean.float())
        self.components.copy_(comps)
        self.variances.copy_((evals[:k] / (n_cases - 1)).clamp_min(1e-12).float())
        residual = evals[k:].sum() / (n_cases - 1) / max(rows.shape[1] - k, 1)
        self.noise_variance.copy_(residual.float())
        return self

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        f = self.arch.factor
        return F.avg_pool3d(x, f) if f > 1 else x

    def _upsample(self, coarse: torch.Tensor) -> torch.Tensor:
        """Tensors on the pooled grid -> the full grid (trilinear; the inverse of ``_pool`` for smooth fields)."""
        if self.arch.factor == 1:
            return coarse
        return F.interpolate(coarse, size=tuple(self.arch.shape), mode="trilinear", align_corners=False)

    def encode(self, x: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        """Codes (N, k) of x (N, C, Z, Y, X); least squares on the voxels where ``visible`` (N, 1, ...) is 1."""
        x = self._pool(x)
        flat = x.reshape(x.shape[0], -1) - self.mean
        if visible is None:
            return flat @ self.components.T
        weights = self._pool(visible.to(x.dtype)).expand_as(x).reshape(x.shape[0], -1)
        return torch.stack([torch.linalg.solve(self._normal_matrix(w), (self.components * w) @ torch.where(
            w > 0, r, torch.zeros_like(r))) for w, r in zip(weights, flat)])

    def _normal_matrix(self, w: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Wᵀ diag(w) W + s² Λ⁻¹ (k, k) of the masked least squares with voxel weights ``w`` (D,); s² is ``noise``,
        by default the noise variance σ² fitted with the model."""
        k = len(self.variances)
        noise = self.noise_variance if noise is None else noise
        return ((self.components * w) @ self.components.T + torch.diag(noise / self.variances)
                + 1e-6 * torch.eye(k, dtype=w.dtype, device=w.device))

    def reconstruction_std(self, x: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        """Posterior standard deviation (N, C, Z, Y, X) of the reconstruction given the visible voxels.

        Probabilistic PCA: the code's posterior covariance is s² (Wᵀ D W + s² Λ⁻¹)⁻¹ (D: visible voxels), so a
        voxel's variance is wᵥᵀ Σ wᵥ: large where the model must guess (hidden regions, shape modes the visible
        voxels do not pin down), small where the input decides. s² is the case's own residual variance on its
        visible bone (voxels where the input or its reconstruction exceeds BONE_LEVEL), so an input that the
        model explains badly (displaced fragments, unusual anatomy) widens the posterior. The noise floor s² is
        left out of the voxel variances; the pooled result is upsampled like the reconstruction.
        """
        xp = self._pool(x)
        weights = torch.ones_like(xp) if visible is None else self._pool(visible.to(x.dtype)).expand_as(xp)
        recon = (self.mean + self.encode(x, visible) @ self.components).reshape(xp.shape)
        stds = []
        for xi, ri, wi in zip(xp, recon, weights):
            band = (wi > 0.5) & ((xi > BONE_LEVEL) | (ri > BONE_LEVEL)).any(0, keepdim=True)
            noise = ((xi - ri) ** 2)[band].mean() if band.any() else self.noise_variance
            normal = self._normal_matrix(wi.reshape(-1), noise)
            chol = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(normal)))
            stds.append((noise.sqrt() * chol.T @ self.components).pow(2).sum(0).sqrt())
        return self._upsample(torch.stack(stds).reshape(xp.shape))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Tensors (N, C, Z, Y, X) on the full grid from codes (N, k)."""
        return self._upsample((self.mean + z @ self.components).reshape(z.shape[0], self.arch.in_channels,
                                                                        *self.coarse_shape))

    def reconstruct(self, x: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode(self.encode(x, visible))

    def loss(self, x, target, visible=None):
        mse = masked_mse(self.reconstruct(x, visible), target, visible)
        return mse, {"mse": mse.item()}
