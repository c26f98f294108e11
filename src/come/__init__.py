"""come: compress Hugging Face causal LMs by layer concatenation (CoMe, arXiv 2510.15304)."""

__version__ = "0.1.0"

from .config import CompressConfig  # noqa: E402
from .errors import ComeError  # noqa: E402
from .pipeline import compress  # noqa: E402
from .plan import Plan, load_plan  # noqa: E402
from .distill import DistillConfig, distill  # noqa: E402
from .evaluate import evaluate  # noqa: E402

__all__ = ["CompressConfig", "ComeError", "DistillConfig", "Plan", "compress", "distill", "evaluate", "load_plan",
           "__version__"]
