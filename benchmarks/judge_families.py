"""Per family of tests/support/tiny_models.py, each figure effect-relative against PEFT's own stacked forward.

    PYTHONPATH=. python benchmarks/judge_families.py llama gemma qwen2 bert modernbert t5 mixtral

Inputs: a LoRA (with the input embedding on tied models) and a LoHa, made by PEFT. Columns: our runtime
stacking them; the cat merge loaded by PEFT; verify's row (reference, error); verify on a wrong merge
(first input's B halved: exit code and error); the baked model loaded by transformers.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from click.testing import CliRunner
from merging_cli.main import cli

from merging.base.load import load_base
from merging.core.adapter import base_shapes, weighted
from merging.eval import judge
from merging.formats import peft as fp
from merging.runtime.stacked import stacked
from tests.support.tiny_models import FAMILIES, build, inputs, output, save_base
from tests.test_judge_families import _inputs, _wrong


def err(y: torch.Tensor, ref: torch.Tensor, base: torch.Tensor) -> float:
    return float((y - ref).double().norm() / (ref - base).double().norm())


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def row(family: str, d: Path) -> str:
    """One family's figures."""
    base = save_base(family, d / "base")
    a, b = _inputs(family, d)
    m, x = build(family), inputs(family)
    y0 = output(m, x)
    with judge.peft_stacked(m, judge.Stacker(judge.PEFT, "mixed", (a, b))):
        yp = output(m, x)
    with stacked(m, weighted([fp.read(f).refine_targets(base_shapes(m)) for f in (a, b)])):
        yo = output(m, x)
    invoke("merge", a, b, "-s", "cat", "-o", d / "m")
    with judge.peft_loaded(m, d / "m"):
        ym = output(m, x)
    r = json.loads(invoke("verify", "--base", base, a, b, "--merged", d / "m", "--json").output)["rows"][0]
    w = invoke("verify", "--base", base, a, b, "--merged", _wrong(d / "m", d / "w"), "--json")
    wrong = json.loads(w.output)["rows"][0]["effect_rel_error"]
    invoke("bake", "--base", base, a, b, "-o", d / "baked")
    baked, _ = load_base(d / "baked", "cpu", task_type=FAMILIES[family].task_type)
    tie = json.loads((d / "baked" / "config.json").read_text()).get("tie_word_embeddings")
    return (f"{family:13s} runtime {err(yo, yp, y0):.1e}  merged {err(ym, yp, y0):.1e}  "
            f"verify {r['reference']} {r['effect_rel_error']:.1e} passed={r['passed']}  "
            f"wrong exit {w.exit_code} {wrong:.1e}  "
            f"bake {err(output(baked, x), yp, y0):.1e} tie_word_embeddings={tie}")  # fmt: skip


if __name__ == "__main__":
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    for fam in sys.argv[1:] or list(FAMILIES):
        with tempfile.TemporaryDirectory() as tmp:
            print(row(fam, Path(tmp)), flush=True)
