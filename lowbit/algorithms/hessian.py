"""Streaming statistics of a linear layer's inputs, in memory that does not grow with the data.

GPTQ needs the Hessian of the layer's squared output error, H = 2 X^T X / n over the n input
rows seen; AWQ needs the same second-moment matrix (to score candidate scales by output error
without keeping the activations) plus each input channel's mean magnitude. One accumulator
serves both: memory is O(in_features^2) whatever the number of calibration samples.
"""

from __future__ import annotations

import torch

from lowbit.errors import CalibrationError


class HessianAccumulator:
    """Running H = 2/n * sum x x^T and mean |x| per input feature over rows x of width `in_features`.

    Running sums are kept in `dtype`: float64 by default (long calibration runs add many small
    terms), float32 where memory matters more (llm-compressor's GPTQ accumulates in float32; half
    the in^2 memory); each batch's product is computed in the input's precision, at least
    float32. Rows may come from
    any leading shape `[..., in_features]`; an optional boolean `mask` over the leading shape
    keeps only the real tokens (padding rows would otherwise bias the statistics).
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float64) -> None:
        self.in_features = in_features
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._gram = torch.zeros(in_features, in_features, dtype=dtype, device=self.device)
        self._abs_sum = torch.zeros(in_features, dtype=torch.float64, device=self.device)
        self._abs_max = torch.zeros(in_features, dtype=torch.float64, device=self.device)
        self.count = 0

    def add(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add the rows of `x` ([..., in_features]); with `mask` ([...]), only rows where it is true."""
        x = torch.as_tensor(x)
        if x.shape[-1] != self.in_features:
            raise CalibrationError(f"calibration rows have {x.shape[-1]} features but the layer takes "
                                   f"{self.in_features}; feed the layer's own inputs")
        if mask is not None:
            x = x[torch.as_tensor(mask, device=x.device).bool()]
        # One batch's product in float32 (fast on CPUs and GPUs), the running sums in float64.
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        rows = x.reshape(-1, self.in_features).to(self.device, compute)
        if rows.shape[0] == 0:
            return
        if not bool(torch.isfinite(rows).all()):
            raise CalibrationError("calibration activations contain NaN or infinite values; "
                                   "check the calibration data and the float model (fp16 overflow?)")
        self._gram += (rows.T @ rows).to(self._gram.dtype)
        magnitude = rows.abs()
        self._abs_sum += magnitude.sum(dim=0, dtype=torch.float64)
        self._abs_max = torch.maximum(self._abs_max, magnitude.amax(dim=0).to(torch.float64))
        self.count += rows.shape[0]

    def _require_samples(self) -> None:
        if self.count == 0:
            raise CalibrationError("no calibration rows were recorded for this layer; "
                                   "give calibration data that reaches it (non-empty, not all padding)")

    @property
    def gram(self) -> torch.Tensor:
        """X^T X / n (in the accumulator's dtype): the mean second moment of the inputs."""
        self._require_samples()
        return self._gram / self.count

    @property
    def hessian(self) -> torch.Tensor:
        """H = 2 X^T X / n (in the accumulator's dtype), the Hessian GPTQ works with."""
        self._require_samples()
        return self._gram * (2.0 / self.count)

    @property
    def abs_mean(self) -> torch.Tensor:
        """mean |x| per input feature (float64)."""
        self._require_samples()
        return self._abs_sum / self.count

    @property
    def abs_max(self) -> torch.Tensor:
        """max |x| per input feature (float64), as SmoothQuant needs."""
        self._require_samples()
        return self._abs_max.clone()
