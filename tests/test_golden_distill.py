"""The golden distillation runs recorded before distill.py was split into modules
(tests/golden_distill.py) are reproduced: the same log and output weights, byte for byte
(to 1e-4 on another CPU instruction set / torch build)."""

from __future__ import annotations

import json

from golden_distill import FILE, distill_records
from test_golden import _close, _same_machine


def test_distill_golden_runs(tokenizer):
    """sp, mp, LoRA, MSE layer loss with every layer trained, and a resumed run."""
    golden = json.loads(FILE.read_text())
    got = json.loads(json.dumps(distill_records(tokenizer)))  # tuples -> lists, as recorded
    if not _same_machine(golden["machine"]):
        _close(got, golden["runs"])
        return
    assert set(got) == set(golden["runs"])
    for name, want in golden["runs"].items():
        assert got[name] == want, name
