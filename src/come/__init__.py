"""come: compress Hugging Face causal LMs by layer concatenation (CoMe, arXiv 2510.15304)."""

from ._version import __version__  # noqa: E402

from .config import CompressConfig, EvalConfig  # noqa: E402
from .errors import ComeError  # noqa: E402
from .compression import compress  # noqa: E402
from .plan import Plan, load_plan  # noqa: E402
from .distill import distill  # noqa: E402
from .distill_config import DistillConfig  # noqa: E402
from .evaluate import evaluate  # noqa: E402

__all__ = ["CompressConfig", "ComeError", "EvalConfig", "DistillConfig", "Plan", "compress", "distill", "evaluate", "load_plan",
           "__version__"]
