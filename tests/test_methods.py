"""The method registry and every method on come's plumbing (ShortGPT, ReplaceMe, LaCo,
averaging; CoMe itself in test_pipeline.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from come import CompressConfig, compress
from come.engine.dropping import absorb
from come.methods.replaceme import angle_block
from come.methods.shortgpt import lowest_bi_layers
from come.models.checkpoint import save_checkpoint
from come.models.data import token_windows

from conftest import corpus, tiny_model


def test_absorb_groups():
    assert absorb([2, 3], 6) == [[0], [1, 2, 3], [4], [5]]
    assert absorb([0, 1, 4], 6) == [[0, 1, 2], [3, 4], [5]]


def test_selection_rules():
    assert lowest_bi_layers([0.5, 0.1, 0.3, 0.05], 2, []) == [1, 3]
    assert lowest_bi_layers([0.5, 0.1, 0.3, 0.05], 2, [3]) == [1, 2]
    base = torch.randn(4, 8)
    states = [torch.randn(4, 8), base, base + 1e-3, base + 2e-3, torch.randn(4, 8)]
    assert angle_block(states, 2, []) == [1, 2]


@pytest.mark.parametrize("method,extra", [("shortgpt", {}), ("shortgpt", {"refit": "ls"}),
                                          ("replaceme", {}), ("replaceme", {"select": "bi"})])
def test_baseline_end_to_end(tokenizer, tmp_path, method, extra):
    dense = tiny_model("llama")
    calib = token_windows(corpus(), tokenizer, 16, 32, seed=0)
    model, plan = compress(copy.deepcopy(dense), tokenizer,
                           CompressConfig(method=method, sparsity=0.3, device="cpu", **extra), calib=calib)
    assert plan.method == method
    assert sum(plan.groups, []) == list(range(6))
    assert plan.achieved_sparsity >= 0.3
    refits = [m.refit for m in plan.merges]
    if method == "replaceme" or extra.get("refit") == "ls":
        assert all(r is not None and r["heldout_err_after"] <= r["heldout_err_before"] for r in refits)
    else:
        assert all(r is None for r in refits)
        # plain drop: kept layers are bit-identical to the dense ones
        removed = {i for m in plan.merges for i in m.group_b}
        kept = [next(i for i in g if i not in removed) for g in plan.groups]
        for new, old in zip(model.model.layers, [dense.model.layers[i] for i in kept]):
            assert torch.equal(new.mlp.down_proj.weight, old.mlp.down_proj.weight)
    out = save_checkpoint(model, tokenizer, plan, tmp_path / "o")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == plan.num_layers_after


def test_replaceme_drops_a_layer_that_writes_nothing_without_change(tokenizer):
    """A layer whose output projections are zero has BI 0: it is the one dropped, and the
    model's logits do not move (the map stays the identity)."""
    dense = tiny_model("llama")
    with torch.no_grad():
        dense.model.layers[3].self_attn.o_proj.weight.zero_()
        dense.model.layers[3].mlp.down_proj.weight.zero_()
    calib = token_windows(corpus(), tokenizer, 16, 32, seed=0)
    model, plan = compress(copy.deepcopy(dense), tokenizer,
                           CompressConfig(method="replaceme", select="bi", sparsity=0.12, device="cpu"), calib=calib)
    assert plan.groups[2] == [2, 3]
    ids = calib[:2]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)


def test_rdsc_and_average_operators(tokenizer):
    """On two single layers LaCo's RDSC is theta_A + (theta_B - theta_A) = theta_B exactly;
    averaging gives the mean of every tensor."""
    from come.merging.merge import rdsc_coefficients

    assert rdsc_coefficients(3) == [-1.0, 1.0, 1.0]
    dense = tiny_model("llama")
    calib = token_windows(corpus(), tokenizer, 16, 32, seed=0)
    for method in ("laco", "average"):
        model, plan = compress(copy.deepcopy(dense), tokenizer,
                               CompressConfig(method=method, sparsity=0.12, device="cpu"), calib=calib)
        m = plan.merges[0]
        assert m.operator == {"laco": "rdsc", "average": "average"}[method]
        a, b = dense.model.layers[m.group_a[0]], dense.model.layers[m.group_b[0]]
        got = model.model.layers[m.position].mlp.up_proj.weight
        want = b.mlp.up_proj.weight if method == "laco" else (a.mlp.up_proj.weight + b.mlp.up_proj.weight) / 2
        torch.testing.assert_close(got, want)
    w = [torch.ones(2), 2 * torch.ones(2), 4 * torch.ones(2)]
    assert torch.equal(sum(c * t for c, t in zip(rdsc_coefficients(3), w)), 5 * torch.ones(2))


# ---- the registry -------------------------------------------------------------------

from come.methods import REGISTRY, get_method, method_names  # noqa: E402


@pytest.mark.parametrize("name", method_names())
def test_every_registered_method_writes_a_stock_checkpoint_and_a_plan(tokenizer, tmp_path, name):
    """Whatever a method does, its output is a stock checkpoint with one Plan covering every
    original layer, reached through `compress()` by name alone."""
    from come.settings.plan import load_plan

    dense = tiny_model("qwen2")
    calib = token_windows(corpus(), tokenizer, 8, 32, seed=0)
    model, plan = compress(copy.deepcopy(dense), tokenizer, CompressConfig(method=name, sparsity=0.3, device="cpu"),
                           calib=calib)
    assert plan.method == name and plan.settings["method"] == name
    assert sum(plan.groups, []) == list(range(6)) and plan.num_layers_after < 6
    assert plan.settings["refit"] == REGISTRY[name].default_refit
    out = save_checkpoint(model, tokenizer, plan, tmp_path / name)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids = calib[:2]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    assert load_plan(out).groups == plan.groups


def test_the_cli_and_compare_read_the_registry():
    import typer

    from come.cli.app import app
    from come.settings.registry import default_methods

    params = typer.main.get_command(app).commands["compress"].params
    method = next(p for p in params if "--method" in getattr(p, "opts", []))
    assert method.metavar == "[" + "|".join(method_names()) + "]"
    for name in method_names():
        assert f"{name}: {REGISTRY[name].summary}" in method.help
    assert default_methods().split(",") == [n for n in method_names() if REGISTRY[n].compared_by_default]
    assert method_names()[0] == "come"
    with pytest.raises(Exception, match="--method must be one of come, shortgpt"):
        get_method("magic")


def test_reverse_order_drops_the_layers_before_the_final_one():
    from come.methods.reverse_order import last_layers_before_final

    assert last_layers_before_final(6, 2, []) == [3, 4]
    assert last_layers_before_final(6, 2, [4]) == [2, 3]


NEW_METHOD = '''
"""A method added by a test: drop the layers after the first --skip-first (one file is enough,
its own option included)."""
from dataclasses import dataclass
from typing import ClassVar

from ..errors import ComeError
from ..settings.options import option
from .base import DropMethod, register


@dataclass
class FirstLayersOptions:
    cli_panel: ClassVar[str] = "First layers"

    skip_first: int = option(0, "Layers kept at the start before the dropped ones.", bounds=">= 0")


@register
class FirstLayers(DropMethod):
    name = "first-layers"
    summary = "drop the first layers (a test's method)"
    own_options = FirstLayersOptions

    def check(self, cfg):
        if cfg.skip_first > 3:
            raise ComeError(f"--skip-first {cfg.skip_first}: at most 3")

    def select(self, profile, n, cfg):
        return list(range(cfg.skip_first, cfg.skip_first + n))
'''


def test_a_new_method_is_one_new_file(tmp_path, tokenizer, text_file):
    """Copy the package, add ONE file under methods/, and the new method is in the registry,
    in `come compress --method`'s choices and help, and compresses a model end to end; its own
    option (--skip-first) is in the help as its own panel, in `come compare` specs, in the
    generated reference (docs/cli.md, README's methods table), checked by the method, refused
    for the other methods, and read by the run."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import come

    pkg = tmp_path / "src" / "come"
    shutil.copytree(Path(come.__file__).parent, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "methods" / "first_layers.py").write_text(NEW_METHOD)
    model = tmp_path / "dense"
    tiny_model("llama").save_pretrained(model)
    tokenizer.save_pretrained(model)
    common = (f"'--calib', {str(text_file)!r}, '--nsamples', '8', '--seqlen', '32', '--device', 'cpu', "
              "'--sparsity', '0.3'")
    script = (
        "import sys; from typer.testing import CliRunner; from come.cli.app import app; from come.settings.plan import load_plan\n"
        "from come.methods import method_names; assert 'first-layers' in method_names(), method_names()\n"
        "import typer; ps = typer.main.get_command(app).commands['compress'].params\n"
        "assert any('first-layers' in (p.help or '') for p in ps)\n"
        "skip = next(p for p in ps if '--skip-first' in p.opts)\n"
        "assert skip.rich_help_panel == 'First layers (--method first-layers)', skip.rich_help_panel\n"
        "from come.cli.reference import markdown; from come.cli.docs_tables import methods_table\n"
        "assert '#### First layers (--method first-layers)' in markdown() and '| `--skip-first` | `0` | Layers kept' in markdown()\n"
        "assert '| `first-layers` | drop | none | `--skip-first` |' in methods_table(), methods_table()\n"
        "from come.settings.specs import method_list; from come.errors import ComeError\n"
        "spec = method_list('first-layers:skip-first=2,shortgpt')[0]; assert spec.overrides == (('skip_first', 2),)\n"
        "for bad, why in (('shortgpt:skip-first=1', 'read by --method first-layers only'), \n"
        "                 ('first-layers:skip-first=5', 'at most 3'), ('first-layers:skip-first=-1', 'must be >= 0')):\n"
        "    try: method_list(bad); raise SystemExit('accepted ' + bad)\n"
        "    except ComeError as e: assert why in str(e), e\n"
        f"r = CliRunner().invoke(app, ['compress', {str(model)!r}, '--out', {str(tmp_path / 'no')!r}, '--method', 'shortgpt',\n"
        f"    '--skip-first', '1', {common}]); assert r.exit_code == 2 and 'Traceback' not in r.output, r.output\n"
        f"for skip, out in (('0', 'a'), ('2', 'b')):\n"
        f"    r = CliRunner().invoke(app, ['compress', {str(model)!r}, '--out', {str(tmp_path)!r} + '/' + out, '--method',\n"
        f"        'first-layers', '--skip-first', skip, {common}]); assert r.exit_code == 0, r.output\n"
        f"    plan = load_plan({str(tmp_path)!r} + '/' + out); print(plan.groups, plan.settings['skip_first'])\n"
    )
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path / "src")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    first, second = done.stdout.strip().splitlines()[-2:]
    assert first.startswith("[[0, 1") and first.endswith(" 0")  # the first layers were absorbed
    assert second == "[[0], [1, 2, 3, 4], [5]] 2"  # layers 2-4 dropped: 0 and 1 kept, 1 stands for them


def test_an_option_has_one_meaning():
    """A method's own option group may extend another's (CoMe's extends the merge loop's), but not
    declare an option another group already declares: registering such a method is refused."""
    from dataclasses import dataclass

    from come.methods import DropMethod, register
    from come.settings.options import option

    @dataclass
    class Clashing:
        split: str = option("x", "Another meaning of --split.")

    class Other(DropMethod):
        name, summary, own_options = "clashing", "a test's method", Clashing

    with pytest.raises(ValueError, match="option 'split' is already ComeOptions's"):
        register(Other)
    assert "clashing" not in REGISTRY
