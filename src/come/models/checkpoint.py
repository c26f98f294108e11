"""Loading models (Hub id, local dir or .gguf file) and writing checkpoints atomically."""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError

from ..errors import ComeError
from ..settings.hub import OFFLINE_HINT, hub_access
from ..settings.plan import Plan
from .adapters import get_adapter
from .model_card import CARD_FILE, front_matter, looks_like_hub_id, model_card
from .outputs import LOG_FILE, temp_prefix, temp_sibling
from .preflight import check_model_dir, check_output_dir, check_tokenizer_dir

log = logging.getLogger("come")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "auto": "auto"}


def _source(name: str) -> tuple[str, dict]:
    """(what from_pretrained gets, extra kwargs): a .gguf file loads through gguf_file=."""
    path = Path(name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ComeError(f"GGUF file not found: {name}")
        stat = path.stat()
        _check_gguf(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        return str(path.parent), {"gguf_file": path.name}
    return name, {}


@functools.lru_cache(maxsize=8)
def _check_gguf(path: str, size: int, mtime_ns: int) -> None:
    """The file parses as GGUF with every tensor inside it (the `gguf` reader maps it, reads the
    header and checks each tensor's extent): a truncated download is one line before any load.
    Once per file version (size and mtime in the key)."""
    try:
        from gguf import GGUFReader
    except ImportError:  # transformers names the package when it reads the file
        return
    try:
        GGUFReader(path)
    except Exception as exc:  # the reader fails on a short or foreign file with many types
        raise ComeError(f"{path} is truncated or not a GGUF file ({type(exc).__name__}: {str(exc)[:80]}); "
                        "re-download it") from None


def load_config(name: str):
    """The model's config, with the architecture checked before any weight is read."""
    from transformers import AutoConfig

    src, extra = _source(name)
    try:
        with hub_access() as online:
            config = AutoConfig.from_pretrained(src, **extra)
    except OSError as exc:
        if not online:
            raise ComeError(f"cannot load model {name!r}: not a local directory with config.json, and "
                            f"{OFFLINE_HINT}; pass a local model directory or .gguf file") from None
        raise ComeError(f"cannot load model {name!r}: not a local directory with config.json and not reachable "
                        f"on the Hub ({str(exc).splitlines()[0][:120]})") from exc
    except ValueError as exc:
        raise ComeError(f"cannot read the config of {name!r}: {str(exc).splitlines()[0][:160]}") from exc
    get_adapter(config)
    check_model_dir(name)
    return config


def meta_model(config):
    """The model's structure without weights (device 'meta'): for parameter counts up front."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    check_tokenizer_dir(name)
    src, extra = _source(name)
    try:
        with hub_access():
            return AutoTokenizer.from_pretrained(src, **extra)
    except (OSError, ValueError, TypeError) as exc:
        raise ComeError(f"cannot load the tokenizer of {name!r} ({str(exc).splitlines()[0][:160]}); save the "
                        "tokenizer beside the model") from None


def loaded_dtype(config, dtype: str = "auto") -> torch.dtype:
    """The dtype `load_model` gives the weights for `dtype` (auto: the checkpoint's own, as its
    config names it; fp32 when it names none): what the memory plans count."""
    chosen = DTYPES.get(dtype, "auto")
    if chosen != "auto":
        return chosen
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, stored) if isinstance(stored, str) else stored


def load_model(name: str, dtype: str = "auto", tokenizer=None):
    """(model on CPU, tokenizer). Layers later visit the compute device one at a time."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ComeError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    load_config(name)
    src, extra = _source(name)
    tokenizer = tokenizer or load_tokenizer(name)
    try:
        with hub_access():
            model = AutoModelForCausalLM.from_pretrained(src, dtype=DTYPES[dtype], **extra)
    except (OSError, ValueError, RuntimeError) as exc:  # unreadable, truncated or mismatched weights
        raise ComeError(f"cannot load the weights of {name!r} ({str(exc).splitlines()[0][:160]}); re-download or "
                        "re-save the model") from None
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


def _alive(pid: int) -> bool:
    """Whether process `pid` may be running (another user's, or a number no pid can be: kept as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        pass
    return True


def _stale_siblings(out: Path) -> None:
    """Temporary siblings of `out` left by killed runs are removed: only directories named
    exactly as atomic_dir names them (outputs.temp_sibling) whose pid is no longer alive;
    another live run's, and anything else however it is named, are left alone."""
    for old in out.parent.iterdir():
        temp = temp_sibling(old.name)
        if temp is None or temp[0] != out.name or old.is_symlink() or not old.is_dir() or _alive(temp[1]):
            continue
        log.warning("removing %s, left by an interrupted run", old)
        shutil.rmtree(old, ignore_errors=True)


class _Terminated(BaseException):
    """SIGTERM inside an atomic write: unwinds like SIGINT's KeyboardInterrupt, so the
    temporary directory is removed before the signal ends the process."""


@contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT / SIGTERM that arrive during the block are recorded and delivered when it ends
    (SIGINT -> KeyboardInterrupt; SIGTERM -> the handler in place then, or its default
    action): for the renames that put a result in place. SIGKILL cannot be held. Outside
    the main thread (where handlers cannot be set): no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    before = {s: signal.signal(s, lambda n, _frame: caught.append(n)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        for s in caught:
            signal.raise_signal(s)


@contextmanager
def _signals_for_write() -> Iterator[None]:
    """While writing: SIGTERM (when it has its default action) raises _Terminated and, once
    the block has cleaned up, is delivered again (the process ends by it, exit status 143 in a
    shell). Outside the main thread: no-op."""
    unwind = threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

    def on_term(signum, _frame):
        raise _Terminated(signum)

    if unwind:
        signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    except _Terminated:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.raise_signal(signal.SIGTERM)
        raise
    finally:
        if unwind:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


_WRITE_ERRORS = (OSError, SafetensorError)  # safetensors reports a failed write as its own error


def _write_error(out: Path, exc: Exception) -> ComeError:
    why = getattr(exc, "strerror", None) or str(exc).splitlines()[0][:160]
    return ComeError(f"cannot write {out}: {why}; nothing was written (check the free space and permissions there, "
                     "or choose another --out)")


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False, keep: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a temporary sibling of `out` to fill; it is renamed to `out` only when the block
    ends without error, so an interrupted run (SIGINT, SIGTERM, a failed write) leaves no
    half-written directory and no temporary one (and the next run removes what a killed one
    left). `out` is checked first (preflight.check_output_dir: with `overwrite`, only an
    output `come` wrote is replaced). A replaced `out` is moved aside, not deleted, until the
    new one is in place; its entries named in `keep` (distill's checkpoints/) move into the
    new one. A write the file system refuses is a one-line ComeError."""
    out = check_output_dir(out, overwrite, kept=keep)
    with _signals_for_write():
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            _stale_siblings(out)
            tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out.name), dir=out.parent))
        except _WRITE_ERRORS as exc:
            raise _write_error(out, exc) from None
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the output is a normal directory
            yield tmp
            with signals_held():
                _swap(tmp, out, keep)
        except _WRITE_ERRORS as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise _write_error(out, exc) from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _move(names: tuple[str, ...], src: Path, dst: Path) -> None:
    for name in names:
        if (src / name).exists():
            os.replace(src / name, dst / name)


def _swap(tmp: Path, out: Path, keep: tuple[str, ...] = ()) -> None:
    """`tmp` becomes `out`; a replaced `out` is moved aside first (its `keep` entries into
    `tmp`) and deleted once the new one is in; on a failed rename all goes back."""
    old = tmp.with_name(f"{tmp.name}-replaced")
    if out.exists():
        os.replace(out, old)
        _move(keep, old, tmp)
    try:
        os.replace(tmp, out)
    except OSError:
        if old.exists():
            _move(keep, tmp, old)
            os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(model, tokenizer, plan: Plan | None, out: str | Path, overwrite: bool = False, *,
                    results: dict | None = None, distill_log: dict | None = None,
                    keep: tuple[str, ...] = ()) -> Path:
    """Write model (safetensors) + config + tokenizer + come_plan.json + the model card
    (README.md, when there is a Plan) to `out`, atomically (atomic_dir: `overwrite` and `keep`).
    `results` (`come eval`'s dict) adds its section to the card; `distill_log` its section and
    distill_log.json."""
    out = Path(out)
    with atomic_dir(out, overwrite, keep) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if plan is not None:
            plan.save(tmp)
            base_model, license = source_metadata(plan.model)
            (tmp / CARD_FILE).write_text(model_card(plan, results, distill_log, base_model=base_model,
                                                    license=license, name=out.name))
        if distill_log is not None:
            (tmp / LOG_FILE).write_text(json.dumps(distill_log, indent=1))
    return out


def source_metadata(name: str) -> tuple[str | None, str | None]:
    """(base_model, license) of the model `name` that was compressed, for its card; nothing is
    fetched. A Hub id is its own base model; a local directory (or a .gguf file's folder) gives
    its config's `_name_or_path` when that is a Hub id. The license: the source README's front
    matter (for a Hub id, the README in the local Hub cache, if any), else its config's."""
    if not name:
        return None, None
    path = Path(name)
    folder = path.parent if path.suffix == ".gguf" else path
    if folder.is_dir():
        config = _json_object(folder / "config.json") if path.suffix != ".gguf" else {}
        base = config.get("_name_or_path")
        base = base if looks_like_hub_id(base) and not Path(base).exists() else None
        return base, _license(_read(folder / CARD_FILE), config)
    if not looks_like_hub_id(name):
        return None, None
    readme = None
    try:
        from huggingface_hub import try_to_load_from_cache

        readme = try_to_load_from_cache(name, CARD_FILE)
    except Exception:  # noqa: BLE001  (a card is never worth failing a save)
        pass
    return name, _license(_read(Path(readme)) if isinstance(readme, str) else "", {})


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _json_object(path: Path) -> dict:
    try:
        data = json.loads(_read(path) or "{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _license(readme: str, config: dict) -> str | None:
    value = front_matter(readme).get("license") or config.get("license")
    return value if isinstance(value, str) else None
