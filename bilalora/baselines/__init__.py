"""Classical (training-free) dehazing baselines. numpy + OpenCV, no torch.

* :func:`dehaze_dcp` / :class:`DCP`: dark channel prior with guided-filter
  refinement (He et al. 2009/2010).
* :func:`stretch_channels` / :func:`stretch_global`: per-channel and global grey
  1-99 % percentile contrast stretches (auto levels), the trivial post-processes
  a dehazer is compared with (:data:`STRETCHES` names them).
"""

from __future__ import annotations

from .dcp import DCP, DCPResult, dcp_estimate, dehaze_dcp, guided_filter
from .stretch import STRETCHES, stretch_channels, stretch_global

__all__ = [
    "DCP",
    "STRETCHES",
    "DCPResult",
    "dcp_estimate",
    "dehaze_dcp",
    "guided_filter",
    "stretch_channels",
    "stretch_global",
]
