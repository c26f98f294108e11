"""Loading models (Hub id, local dir or .gguf file) and writing checkpoints atomically."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .adapters import get_adapter
from .errors import ComeError
from .plan import Plan

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "auto": "auto"}


def _source(name: str) -> tuple[str, dict]:
    """(what from_pretrained gets, extra kwargs): a .gguf file loads through gguf_file=."""
    path = Path(name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ComeError(f"GGUF file not found: {name}")
        return str(path.parent), {"gguf_file": path.name}
    return name, {}


def load_config(name: str):
    """The model's config, with the architecture checked before any weight is read."""
    from transformers import AutoConfig

    src, extra = _source(name)
    try:
        config = AutoConfig.from_pretrained(src, **extra)
    except OSError as exc:
        raise ComeError(f"cannot load model {name!r}: not a local directory with config.json and not reachable "
                        f"on the Hub ({str(exc).splitlines()[0][:120]})") from exc
    except ValueError as exc:
        raise ComeError(f"cannot read the config of {name!r}: {str(exc).splitlines()[0][:160]}") from exc
    get_adapter(config)
    return config


def meta_model(config):
    """The model's structure without weights (device 'meta'): for parameter counts up front."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    src, extra = _source(name)
    return AutoTokenizer.from_pretrained(src, **extra)


def load_model(name: str, dtype: str = "auto", tokenizer=None):
    """(model on CPU, tokenizer). Layers later visit the compute device one at a time."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ComeError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    load_config(name)
    src, extra = _source(name)
    tokenizer = tokenizer or load_tokenizer(name)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=DTYPES[dtype], **extra)
    if "gguf_file" in extra:
        model = _plain_copy(model, DTYPES[dtype])
    return model.eval(), tokenizer


def _plain_copy(gguf_model, dtype):
    """transformers de-quantises GGUF on load but marks the model unsaveable; rebuild it as
    a plain model with the same weights so the compressed output is a stock checkpoint."""
    from transformers import AutoModelForCausalLM

    config = gguf_model.config
    del config.quantization_config
    dtype = torch.float32 if dtype == "auto" else dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in gguf_model.state_dict().items()})
    return model


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Refuse a non-empty output directory unless --overwrite (checked BEFORE any work)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ComeError(f"output path {out} exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ComeError(f"output directory {out} exists and is not empty; pass --overwrite or choose another --out")
    return out


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `out` to fill; it is renamed to `out` only when the block
    ends without error, so an interrupted run leaves no half-written directory."""
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint(model, tokenizer, plan: Plan | None, out: str | Path, overwrite: bool = False) -> Path:
    """Write model (safetensors) + config + tokenizer + come_plan.json to `out`, atomically."""
    with atomic_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if plan is not None:
            plan.save(tmp)
    return Path(out)
