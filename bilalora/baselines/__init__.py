"""Classical (training-free) dehazing baselines. numpy + OpenCV, no torch.

* :func:`dehaze_dcp` / :class:`DCP`: dark channel prior with guided-filter
  refinement (He et al. 2009/2010).
"""

from __future__ import annotations

from .dcp import DCP, DCPResult, dcp_estimate, dehaze_dcp, guided_filter

__all__ = ["DCP", "DCPResult", "dcp_estimate", "dehaze_dcp", "guided_filter"]
