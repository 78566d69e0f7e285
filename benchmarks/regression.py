"""Regression harness: the byte-for-byte before/after check for refactors.

Run on the commit before and after a move and expect 0 differences::

    python -m benchmarks.regression run /path/to/checkout-before /tmp/reg/before
    python -m benchmarks.regression run /path/to/checkout-after /tmp/reg/after
    python -m benchmarks.regression compare /tmp/reg/before /tmp/reg/after

``run`` drives the checkout's own CLI (``cli.main``, in a subprocess) over the bundled example
adapters and recipes: every merge strategy, the output formats, conversions, a few bakes into the
example base model, inspections, one verify, and some refusals (a refusal's message and exit code are
its output). Each case writes under ``OUT/<case>/``: whatever the command wrote, plus ``cli.json`` with
the arguments, exit code, stdout and stderr. ``compare`` then checks two such trees file by file
(safetensors headers and tensor bytes, GGUF bytes, parsed JSON, other bytes) and prints every difference.

It uses the standard library, ``safetensors``' file layout and the ``gguf`` package only; it never
imports ``merging``, so it measures whichever checkout it is pointed at.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RUNNER = "import sys; sys.path.insert(0, {!r}); from cli.main import main; sys.argv[0] = 'merging'; main()"
RUN_FILE = "_run.json"  # the raw roots of one run (for normalising); not compared itself
CLI_FILE = "cli.json"  # one case's arguments, exit code, stdout and stderr (normalised)
ADAPTERS = ("add", "sort", "reverse", "translate", "sentiment")
WORKERS = 2  # two cores: two CLI processes at a time
REFUSED = 2  # the CLI's exit code for a refused operation (MergingError and click usage errors)

# Paths: the outputs record the paths they were given (merge_recipe.json, the kohya metadata and the GGUF
# key merging.recipe name the input folders), so the file sizes that merge, convert and inspect report
# depend on the checkout's and OUT's path lengths. The CLI therefore runs in a temporary folder holding
# the symlinks checkout/, out/ and base/, and is given relative paths through them: the recorded paths
# are the same whichever folders a run uses.
#
# The normalisations, and why; everything else must match byte for byte:
# - paths: any absolute OUT, checkout or base model folder left (example-base prints the base's) becomes
#   <OUT>, <CHECKOUT>, <BASE>, in cli.json at run time and in every compared JSON/text/metadata value.
# - timings: merge's summary reports its wall time, as the top-level "seconds" of its --json document
#   (dropped) and as "wrote OUT in 0.15 s" in text mode (becomes "in <T> s"). Nothing else varied between
#   two runs of the same checkout (DARE seeds are fixed, verify is deterministic on one CPU thread).
TIMING_KEY = "seconds"
TIMING_TEXT = re.compile(r" in \d+\.\d\d s$", re.MULTILINE)


@dataclass(frozen=True)
class Case:
    """One CLI invocation; ``stage`` orders cases that read another case's output."""

    name: str
    args: list[str]
    stage: int = 0
    refused: bool = False  # expected to be refused (exit code 2)


@dataclass
class Roots:
    """The paths of one run that are replaced by placeholders, longest first."""

    paths: dict[str, str] = field(default_factory=dict)

    def text(self, s: str) -> str:
        """``s`` with every root path replaced by its placeholder."""
        for placeholder, path in sorted(self.paths.items(), key=lambda kv: -len(kv[1])):
            if path:
                s = s.replace(path, placeholder)
        return s

    def value(self, obj: Any) -> Any:
        """A parsed JSON value with its strings normalised."""
        if isinstance(obj, dict):
            return {k: self.value(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self.value(v) for v in obj]
        if isinstance(obj, str):
            return self.text(obj)
        return obj

    @classmethod
    def of(cls, out: Path) -> Roots:
        """The roots a ``run`` recorded in ``OUT/_run.json``."""
        return cls(json.loads((out / RUN_FILE).read_text())["roots"])


# ---------------------------------------------------------------------------------------------- run


def cases(checkout: Path, out: Path, base: Path) -> list[Case]:
    """Every case: inputs from ``checkout``'s examples, outputs in ``out/<case>/``, base model ``base``."""
    a = {n: str(checkout / "examples" / "adapters" / n) for n in ADAPTERS}
    add, sort, rev, tr, ia3 = (a[n] for n in ADAPTERS)
    recipes = checkout / "examples" / "recipes"
    b = str(base)
    kohya, gguf = "out.safetensors", "out.gguf"  # the file outputs' names
    cs: list[Case] = []

    def o(name: str, leaf: str = "out") -> str:
        return str(out / name / leaf)

    def merge(name: str, *args: str, leaf: str = "out", text: bool = False, refused: bool = False) -> None:
        tail = [] if text else ["--json"]
        cs.append(Case(name, ["merge", *args, "-o", o(name, leaf), *tail], 0, refused))

    def recipe(name: str, toml: str) -> None:
        merge(name, "--recipe", str(recipes / toml))

    def convert(name: str, src: str, to: str, *args: str, leaf: str = "out", stage: int = 0,
                refused: bool = False) -> None:  # fmt: skip
        argv = ["convert", src, "--to", to, "-o", o(name, leaf), *args, "--json"]
        cs.append(Case(name, argv, stage, refused))

    def inspect(name: str, spec: str, *args: str, stage: int = 0) -> None:
        cs.append(Case(name, ["inspect", spec, *args, "--json"], stage))

    for n in ADAPTERS:
        inspect(f"inspect-in-{n}", a[n])
    inspect("inspect-in-add-q_proj", add, "--modules", "*.q_proj")
    inspect("inspect-base", b)

    # cat and svd: exact stacking and its low-rank approximations
    merge("merge-cat-all5", add, sort, rev, tr, ia3, "-s", "cat")
    merge("merge-cat-weighted", add, sort, "-s", "cat", "-w", "1,0.5")
    merge("merge-cat-text", add, rev, "-s", "cat", text=True)
    recipe("merge-cat-recipe-exact", "exact_lora_loha_lokr.toml")
    recipe("merge-svd-recipe-rank8", "svd_rank8.toml")
    recipe("merge-svd-recipe-budget", "svd_budget.toml")
    merge("merge-svd-energy", add, sort, rev, "-s", "svd", "--energy", "0.9")
    merge("merge-svd-rank4-clamp", add, sort, "-s", "svd", "--rank", "4", "--clamp", "0.99")
    merge("merge-svd-lokr", add, tr, "-s", "svd", "--rank", "8")
    budget = ("-s", "svd", "--budget", "100000")
    # refused at 0.1.0: the budget leaves a module at rank 0 and the streamed PEFT write rejects it
    merge("merge-svd-budget", add, sort, *budget, refused=True)
    merge("merge-svd-budget-kohya", add, sort, *budget, "--format", "kohya", leaf=kohya)
    # linear and the sparsifying strategies
    merge("merge-linear", add, sort, "-s", "linear", "-w", "0.7,0.3")
    merge("merge-linear-loha", add, rev, "-s", "linear", refused=True)
    recipe("merge-ties-recipe", "ties_density.toml")
    merge("merge-ties-frequency", add, sort, rev, "-s", "ties", "--density", "0.5", "--majority-sign",
          "frequency", "--rank", "8")  # fmt: skip
    merge("merge-dare_linear", add, sort, "-s", "dare_linear", "--density", "0.3", "--seed", "1")
    merge("merge-dare_linear-seed2", add, sort, "-s", "dare_linear", "--density", "0.3", "--seed", "2")
    merge("merge-dare_ties", add, sort, rev, "-s", "dare_ties", "--seed", "0")
    merge("merge-magnitude_prune", add, sort, "-s", "magnitude_prune", "--density", "0.2")
    # IA³ strategies
    recipe("merge-multiplicative-recipe", "ia3_product.toml")
    merge("merge-multiplicative-ia3", ia3, f"twice={ia3}", "-s", "multiplicative", "-w", "1,0.5")
    merge("merge-geometric", ia3, f"twice={ia3}", "-s", "geometric", "-w", "0.25,0.75")
    merge("merge-geometric-zero-sum", ia3, f"twice={ia3}", "-s", "geometric", "-w", "1,-1", refused=True)
    # the literature methods
    merge("merge-knots-ties", add, sort, "-s", "knots", "--inner", "ties")
    merge("merge-knots-linear", add, sort, rev, "-s", "knots", "--inner", "linear", "--alpha", "0.5")
    merge("merge-knots-all5", add, sort, rev, tr, ia3, "-s", "knots")
    merge("merge-core", add, sort, rev, tr, "-s", "core", "--alpha", "0.8")
    merge("merge-core-dare", add, sort, "-s", "core", "--inner", "dare_ties", "--seed", "3")
    merge("merge-tsv", add, sort, tr, "-s", "tsv")
    merge("merge-tsv-alpha", add, sort, "-s", "tsv", "--alpha", "0.5")
    merge("merge-iso_c", add, sort, rev, "-s", "iso_c")
    recipe("merge-iso_cts-recipe", "iso_cts.toml")
    merge("merge-iso_cts-half", add, sort, "-s", "iso_cts", "--common-fraction", "0.5")
    # output formats and serving
    merge("merge-kohya", add, rev, "-s", "cat", "--format", "kohya", "--base", b, leaf=kohya)
    merge("merge-kohya-nobase", add, sort, "-s", "cat", "--format", "kohya", leaf=kohya)
    merge("merge-gguf", add, sort, "-s", "svd", "--rank", "8", "--format", "gguf", "--base", b, leaf=gguf)
    merge("merge-gguf-ia3", add, ia3, "-s", "cat", "--format", "gguf", "--base", b, leaf=gguf, refused=True)
    merge("merge-gguf-nobase", add, sort, "-s", "cat", "--format", "gguf", leaf=gguf, refused=True)
    merge("merge-uniform-rank", add, sort, rev, "-s", "cat", "--uniform-rank")
    merge("merge-serve-vllm", add, sort, rev, "-s", "svd", "--energy", "0.95", "--serve", "vllm")
    # options refused
    merge("merge-bad-density", add, sort, "-s", "ties", "--density", "1.5", refused=True)
    merge("merge-rank-and-energy", add, sort, "-s", "svd", "--rank", "4", "--energy", "0.9", refused=True)
    merge("merge-unknown-strategy", add, sort, "-s", "nope", refused=True)

    # convert between peft, kohya and gguf (LoHa/LoKr become exact LoRA where needed)
    convert("convert-add-kohya", add, "kohya", "--base", b, leaf=kohya)
    convert("convert-add-kohya-prefix", add, "kohya", "--prefix", "lora_te", leaf=kohya)
    convert("convert-add-gguf", add, "gguf", "--base", b, leaf=gguf)
    convert("convert-add-gguf-f16", add, "gguf", "--base", b, "--outtype", "f16", leaf=gguf)
    convert("convert-reverse-kohya", rev, "kohya", "--base", b, leaf=kohya)
    convert("convert-reverse-peft", rev, "peft")
    convert("convert-translate-gguf", tr, "gguf", "--base", b, "--outtype", "bf16", leaf=gguf)
    convert("convert-sentiment-kohya", ia3, "kohya", "--base", b, leaf=kohya)
    convert("convert-sentiment-gguf", ia3, "gguf", "--base", b, leaf=gguf, refused=True)
    convert("convert-add-gguf-nobase", add, "gguf", leaf=gguf, refused=True)
    convert("convert-sort-uniform", sort, "peft", "--uniform-rank")
    convert("convert-sort-vllm", sort, "peft", "--serve", "vllm")

    # stage 1: read stage 0's outputs
    convert("convert-kohya-to-peft", o("convert-add-kohya", kohya), "peft", "--base", b, stage=1)
    convert("convert-gguf-to-peft", o("convert-add-gguf", gguf), "peft", "--base", b, stage=1)
    convert("convert-gguf-to-peft-nobase", o("convert-add-gguf", gguf), "peft", stage=1, refused=True)
    convert("convert-kohya-to-gguf", o("convert-reverse-kohya", kohya), "gguf", "--base", b,
            leaf=gguf, stage=1)  # fmt: skip
    convert("convert-svd8-to-gguf", o("merge-svd-recipe-rank8"), "gguf", "--base", b, leaf=gguf, stage=1)
    cs.append(Case("merge-cat-from-kohya-gguf", ["merge", o("convert-add-kohya", kohya),
                   o("convert-add-gguf", gguf), "-s", "cat", "--base", b,
                   "-o", o("merge-cat-from-kohya-gguf"), "--json"], 1))  # fmt: skip
    inspect("inspect-out-cat-all5", o("merge-cat-all5"), stage=1)
    inspect("inspect-out-ties", o("merge-ties-recipe"), stage=1)
    inspect("inspect-out-geometric", o("merge-geometric"), stage=1)
    inspect("inspect-out-kohya", o("merge-kohya", kohya), stage=1)
    inspect("inspect-out-gguf", o("merge-gguf", gguf), stage=1)
    inspect("inspect-out-svd-budget", o("merge-svd-budget-kohya", kohya), "--modules", "*.v_proj", stage=1)
    for name, src in (("bake-ties", "merge-ties-recipe"), ("bake-cat-all5", "merge-cat-all5")):
        cs.append(Case(name, ["bake", "--base", b, o(src), "-o", o(name), "--json"], 1))
    verify = ["verify", "--base", b, "--merged", o("merge-cat-recipe-exact"), add, rev, tr, "--device", "cpu"]
    cs.append(Case("verify-cat-exact", [*verify, "--max-new-tokens", "4", "--json"], 1))
    # stage 2: the baked model
    inspect("inspect-baked-ties", o("bake-ties", "out/model.safetensors"), stage=2)
    return cs


def environment() -> dict[str, str]:
    """The caller's environment (MERGING_CACHE included) with one thread and a fixed, colourless console.

    COLUMNS and NO_COLOR pin rich's rendering of the text-mode cases to the same width whatever
    terminal the harness runs from; FORCE_COLOR would otherwise override NO_COLOR.
    """
    env = {k: v for k, v in os.environ.items() if k != "FORCE_COLOR"}
    env.update(OMP_NUM_THREADS="1", COLUMNS="120", NO_COLOR="1")
    return env


def invoke(checkout: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the checkout's CLI with ``args`` in a fresh interpreter."""
    cmd = [sys.executable, "-c", RUNNER.format(str(checkout)), *args]
    return subprocess.run(cmd, cwd=cwd, env=environment(), capture_output=True, text=True)


def record(case: Case, done: subprocess.CompletedProcess[str], folder: Path, roots: Roots) -> None:
    """Write the case's ``cli.json``: normalised arguments, exit code, stdout (parsed when JSON), stderr."""
    try:
        stdout: Any = roots.value(json.loads(done.stdout))
    except ValueError:
        stdout = TIMING_TEXT.sub(" in <T> s", roots.text(done.stdout))
    if case.args[0] == "merge" and isinstance(stdout, dict):
        stdout.pop(TIMING_KEY, None)
    doc = {"args": [roots.text(a) for a in case.args], "exit_code": done.returncode, "stdout": stdout,
           "stderr": roots.text(done.stderr)}  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CLI_FILE).write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")


def run(checkout: Path, out: Path, force: bool = False) -> int:
    """Run every case of ``checkout``'s CLI into ``out``; 1 when a case's outcome was not the expected one."""
    checkout, out = checkout.resolve(), out.resolve()
    if out.exists() and any(out.iterdir()):
        if not force:
            sys.exit(f"{out} is not empty; pass --force to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="regression-cwd-") as tmp:
        cwd = Path(tmp)
        prepared = invoke(checkout, ["example-base"], cwd)
        if prepared.returncode != 0:
            sys.exit(f"example-base failed:\n{prepared.stderr}")
        base = Path(prepared.stdout.strip().splitlines()[-1]).resolve()
        roots = Roots({"<OUT>": str(out), "<CHECKOUT>": str(checkout), "<BASE>": str(base)})
        for link, target in (("checkout", checkout), ("out", out), ("base", base)):
            (cwd / link).symlink_to(target, target_is_directory=True)
        all_cases = cases(Path("checkout"), Path("out"), Path("base"))
        meta = {"roots": roots.paths, "python": sys.executable, "cases": [c.name for c in all_cases]}
        (out / RUN_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        record(Case("example-base", ["example-base"]), prepared, out / "example-base", roots)

        def one(case: Case) -> tuple[Case, int, float]:
            t0 = time.perf_counter()
            done = invoke(checkout, case.args, cwd)
            record(case, done, out / case.name, roots)
            return case, done.returncode, time.perf_counter() - t0

        unexpected = 0
        with ThreadPoolExecutor(WORKERS) as pool:
            for stage in sorted({c.stage for c in all_cases}):
                for case, code, seconds in pool.map(one, [c for c in all_cases if c.stage == stage]):
                    ok = code == (REFUSED if case.refused else 0)
                    unexpected += not ok
                    flag = "" if ok else "  UNEXPECTED"
                    note = " refused" if case.refused else ""
                    print(f"{case.name:32} exit {code}  {seconds:6.1f} s{note}{flag}")
    files = sum(1 for _ in files_under(out))
    print(f"{len(all_cases) + 1} cases, {files} files in {out}, {time.perf_counter() - started:.0f} s")
    return 1 if unexpected else 0


# ------------------------------------------------------------------------------------------ compare


def files_under(root: Path) -> Iterator[str]:
    """Relative paths of the compared files under ``root`` (all but ``_run.json``)."""
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.relative_to(root).as_posix() != RUN_FILE:
            yield p.relative_to(root).as_posix()


def json_diff(a: Any, b: Any, where: str = "") -> Iterator[str]:
    """Where two parsed JSON values differ (a JSON-pointer-like path and both values)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                yield f"{where}/{k}: only in {'A' if k in a else 'B'}"
            else:
                yield from json_diff(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            yield from json_diff(x, y, f"{where}/{i}")
    elif a != b or type(a) is not type(b):
        yield f"{where or '/'}: {_short(a)} vs {_short(b)}"


def _short(v: Any, n: int = 120) -> str:
    s = json.dumps(v, ensure_ascii=False)
    return s if len(s) <= n else s[: n - 3] + "..."


def _maybe_json(v: str) -> Any:
    """A metadata value: parsed when it holds JSON, else the string."""
    try:
        return json.loads(v)
    except ValueError:
        return v


def st_header(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's header and the offset where its data starts."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


def diff_safetensors(pa: Path, pb: Path, ra: Roots, rb: Roots) -> Iterator[str]:
    """Header (names, dtypes, shapes, offsets, normalised metadata), then each tensor's bytes."""
    ha, sa = st_header(pa)
    hb, sb = st_header(pb)
    ma = {k: ra.value(_maybe_json(v)) for k, v in ha.pop("__metadata__", {}).items()}
    mb = {k: rb.value(_maybe_json(v)) for k, v in hb.pop("__metadata__", {}).items()}
    yield from (f"__metadata__{d}" for d in json_diff(ma, mb))
    for name in sorted(set(ha) ^ set(hb)):
        yield f"tensor {name}: only in {'A' if name in ha else 'B'}"
    common = sorted(set(ha) & set(hb))
    for name in common:
        for key in ("dtype", "shape", "data_offsets"):
            if ha[name][key] != hb[name][key]:
                yield f"tensor {name}: {key} {ha[name][key]} vs {hb[name][key]}"
    with open(pa, "rb") as fa, open(pb, "rb") as fb:
        if os.fstat(fa.fileno()).st_size == 0 or os.fstat(fb.fileno()).st_size == 0:
            return
        with mmap.mmap(fa.fileno(), 0, access=mmap.ACCESS_READ) as a, \
                mmap.mmap(fb.fileno(), 0, access=mmap.ACCESS_READ) as b:  # fmt: skip
            for name in common:
                (a0, a1), (b0, b1) = ha[name]["data_offsets"], hb[name]["data_offsets"]
                if a[sa + a0 : sa + a1] != b[sb + b0 : sb + b1]:
                    yield f"tensor {name}: bytes differ"


def gguf_items(path: Path, roots: Roots) -> tuple[dict[str, Any], dict[str, tuple[str, list[int], bytes]]]:
    """A GGUF file's key-values (normalised) and tensors (type, shape, bytes)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    fields = {name: f for name, f in reader.fields.items() if not name.startswith("GGUF.")}  # header counts
    kv = {name: roots.value(f.contents()) for name, f in fields.items()}
    tensors = {t.name: (t.tensor_type.name, [int(d) for d in t.shape], bytes(t.data.tobytes()))
               for t in reader.tensors}  # fmt: skip
    return kv, tensors


def diff_gguf(pa: Path, pb: Path, ra: Roots, rb: Roots) -> Iterator[str]:
    """Identical bytes, or which key-values and tensors differ (after path normalisation)."""
    if pa.read_bytes() == pb.read_bytes():
        return
    (ka, ta), (kb, tb) = gguf_items(pa, ra), gguf_items(pb, rb)
    yield from (f"kv {d.lstrip('/')}" for d in json_diff(ka, kb))
    for name in sorted(set(ta) | set(tb)):
        if name not in ta or name not in tb:
            yield f"tensor {name}: only in {'A' if name in ta else 'B'}"
        elif ta[name][:2] != tb[name][:2]:
            yield f"tensor {name}: {ta[name][:2]} vs {tb[name][:2]}"
        elif ta[name][2] != tb[name][2]:
            yield f"tensor {name}: bytes differ"


def diff_bytes(pa: Path, pb: Path, ra: Roots, rb: Roots) -> Iterator[str]:
    """Identical bytes; text files may differ only by the roots' paths."""
    a, b = pa.read_bytes(), pb.read_bytes()
    if a == b:
        return
    try:
        ta, tb = ra.text(a.decode()), rb.text(b.decode())
    except UnicodeDecodeError:
        yield f"bytes differ ({len(a)} vs {len(b)} bytes)"
        return
    for i, (la, lb) in enumerate(zip(ta.splitlines(), tb.splitlines(), strict=False), 1):
        if la != lb:
            yield f"line {i}: {la[:100]!r} vs {lb[:100]!r}"
            return
    if ta != tb:
        yield f"text differs in length ({len(ta)} vs {len(tb)} characters)"


def diff_file(pa: Path, pb: Path, ra: Roots, rb: Roots) -> Iterator[str]:
    """The differences between two files of the same relative path."""
    if pa.suffix == ".safetensors":
        yield from diff_safetensors(pa, pb, ra, rb)
    elif pa.suffix == ".gguf":
        yield from diff_gguf(pa, pb, ra, rb)
    elif pa.suffix == ".json":
        try:
            a, b = json.loads(pa.read_text()), json.loads(pb.read_text())
        except ValueError:
            yield from diff_bytes(pa, pb, ra, rb)
        else:
            yield from json_diff(ra.value(a), rb.value(b))
    else:
        yield from diff_bytes(pa, pb, ra, rb)


def compare(out_a: Path, out_b: Path) -> int:
    """Print every difference between two ``run`` trees; 1 when there is one."""
    ra, rb = Roots.of(out_a), Roots.of(out_b)
    fa, fb = set(files_under(out_a)), set(files_under(out_b))
    diffs = 0
    for rel in sorted(fa ^ fb):
        print(f"{rel}: only in {out_a if rel in fa else out_b}")
        diffs += 1
    for rel in sorted(fa & fb):
        for d in diff_file(out_a / rel, out_b / rel, ra, rb):
            print(f"{rel}: {d}")
            diffs += 1
    n_cases = len({rel.split("/", 1)[0] for rel in fa | fb})
    print(f"{n_cases} cases, {len(fa & fb)} files compared, {diffs} differences")
    return 1 if diffs else 0


def main(argv: list[str] | None = None) -> int:
    """``run CHECKOUT OUT`` or ``compare OUT_A OUT_B``."""
    doc = (__doc__ or "").splitlines()[0]
    parser = argparse.ArgumentParser(prog="python -m benchmarks.regression", description=doc)
    sub = parser.add_subparsers(dest="verb", required=True)
    p_run = sub.add_parser("run", help="run the cases of CHECKOUT's CLI into OUT")
    p_run.add_argument("checkout", type=Path)
    p_run.add_argument("out", type=Path)
    p_run.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    p_cmp = sub.add_parser("compare", help="compare two run trees file by file")
    p_cmp.add_argument("out_a", type=Path)
    p_cmp.add_argument("out_b", type=Path)
    args = parser.parse_args(argv)
    if args.verb == "run":
        return run(args.checkout, args.out, force=args.force)
    return compare(args.out_a, args.out_b)


if __name__ == "__main__":
    sys.exit(main())
