"""merging/atomic.py through the command line: what --force replaces and keeps, outputs that overlap an
input, file modes, fsync before the swap, stale temporary entries, concurrent writers, and full or
read-only filesystems (a private tmpfs mount where the system allows one)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner
from merging_cli.main import cli

from merging.formats import peft as fp
from merging.storage import atomic

ROOT = Path(__file__).resolve().parents[1]


def _invoke(*args):
    return CliRunner(env={"COLUMNS": "200"}).invoke(cli, [str(a) for a in args])


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def _plant(out: Path) -> dict[str, bytes]:
    (out / "NOTES.txt").write_text("what I tried\n")
    (out / "README.md").write_text("# my adapter\n")
    (out / "logs").mkdir()
    (out / "logs" / "train.log").write_text("step 1 loss 2.0\n")
    return {k: v for k, v in _tree(out).items() if k in ("NOTES.txt", "README.md", "logs/train.log")}


def test_force_replaces_only_what_the_writer_owns(fx, tmp_path):
    ia3, lora, lora_b = (fx.adapter("llama", k) for k in ("ia3", "lora", "lora_b"))
    out = tmp_path / "out"
    assert _invoke("merge", ia3, lora, "-s", "cat", "-o", out).exit_code == 0
    assert (out / "merging_stack.json").is_file()
    (out / "verify_report.json").write_text("{}")  # a verification of the adapter about to be replaced
    mine = _plant(out)
    notes_inode = (out / "NOTES.txt").stat().st_ino
    refused = _invoke("merge", lora, lora_b, "-s", "cat", "-o", out)
    assert refused.exit_code == 2 and "already exists" in refused.output
    r = _invoke("merge", lora, lora_b, "-s", "cat", "-o", out, "--force")
    assert r.exit_code == 0, r.output
    tree = _tree(out)
    assert {k: tree[k] for k in mine} == mine and (out / "NOTES.txt").stat().st_ino == notes_inode
    assert set(tree) == set(mine) | {"adapter_config.json", "adapter_model.safetensors", "merge_recipe.json"}
    said = " ".join(r.output.split())
    assert "replaced merge_recipe.json" in said
    assert "removed ia3, lora, merging_stack.json, verify_report.json" in said
    assert "kept NOTES.txt, README.md, logs" in said
    assert _leftovers(tmp_path) == []


def test_bake_force_keeps_the_users_files_and_drops_stale_shards(fx, tmp_path):
    base, lora = fx.base("llama"), fx.adapter("llama", "lora")
    out = tmp_path / "baked"
    assert _invoke("bake", "--base", base, lora, "-o", out).exit_code == 0
    mine = _plant(out)
    (out / "model-00002-of-00002.safetensors").write_bytes(b"a shard of another base")
    r = _invoke("bake", "--base", base, fx.adapter("llama", "lora_b"), "-o", out, "--force")
    assert r.exit_code == 0, r.output
    tree = _tree(out)
    assert {k: tree[k] for k in mine} == mine and "model-00002-of-00002.safetensors" not in tree
    assert "removed model-00002-of-00002.safetensors" in " ".join(r.output.split())


def _overlaps(fx, tmp_path):
    src = tmp_path / "in"
    shutil.copytree(fx.adapter("llama", "lora"), src)
    base = tmp_path / "base"
    shutil.copytree(fx.base("llama"), base)
    merge = ["merge", src, "-s", "cat", "-o"]
    return src, base, [
        (merge, src, "is"), (merge, src / "sub", "lies inside"), (merge, tmp_path, "contains"),
        (["convert", src, "--to", "peft", "-o"], src, "is"),
        (["convert", src, "--to", "kohya", "-o"], src / "a.safetensors", "lies inside"),
        (["bake", "--base", base, src, "-o"], base, "is"),
        (["bake", "--base", base, src, "-o"], src, "is"),
        (["bake", "--base", base, src, "-o"], base / "baked", "lies inside"),
    ]  # fmt: skip


def test_an_output_overlapping_an_input_is_refused_with_or_without_force(fx, tmp_path):
    src, base, cases = _overlaps(fx, tmp_path)
    before = _tree(tmp_path)
    for args, out, how in cases:
        for force in ([], ["--force"]):
            r = _invoke(*args, out, *force)
            assert r.exit_code == 2, (args, out, r.output)
            line = r.output.strip()
            assert len(line.splitlines()) == 1 and f"the output {how} the input" in line, line
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_every_writer_gives_its_files_the_umasks_mode(fx, tmp_path, mask):
    base, lora, lora_b, ia3 = fx.base("llama"), *(fx.adapter("llama", k) for k in ("lora", "lora_b", "ia3"))
    runs = [
        ("merge", lora, lora_b, "-s", "cat", "-o", tmp_path / "peft"),
        ("merge", ia3, lora, "-s", "cat", "-o", tmp_path / "pair"),
        ("merge", lora, lora_b, "-s", "cat", "--format", "kohya", "-o", tmp_path / "k.safetensors"),
        ("merge", lora, lora_b, "-s", "cat", "--format", "gguf", "--base", base, "-o", tmp_path / "g.gguf"),
        ("convert", fx.adapter("llama", "loha"), "--to", "peft", "-o", tmp_path / "converted"),
        ("bake", "--base", base, lora, "-o", tmp_path / "baked"),
    ]  # fmt: skip
    old = os.umask(mask)
    try:
        for args in runs:
            r = _invoke(*args)
            assert r.exit_code == 0, (args, r.output)
    finally:
        os.umask(old)
    for p in tmp_path.rglob("*"):
        want = (0o777 if p.is_dir() else 0o666) & ~mask
        assert p.stat().st_mode & 0o7777 == want, f"{p}: {oct(p.stat().st_mode & 0o7777)}, not {oct(want)}"


def test_a_file_linked_into_an_output_keeps_the_users_mode(tmp_path):
    """``link_tree`` hard-links a base's untouched files into the output (a pipeline bake): settling the
    output's modes must not chmod the user's own file through the shared inode."""
    base = tmp_path / "base"
    base.mkdir()
    kept = base / "vae.safetensors"
    kept.write_bytes(b"weights")
    kept.chmod(0o444)
    with atomic.atomic_folder(tmp_path / "out") as tmp:
        atomic.link_tree(kept, tmp / kept.name)
        (tmp / "new.json").write_text("{}")
    assert kept.stat().st_mode & 0o7777 == 0o444
    assert (tmp_path / "out" / "vae.safetensors").read_bytes() == b"weights"
    assert (tmp_path / "out" / "new.json").stat().st_mode & 0o7777 == 0o666 & ~atomic.umask()


@pytest.mark.system
def test_files_and_folders_are_fsynced_before_the_swap_and_the_old_output_goes_last(fx, tmp_path):
    if not shutil.which("strace") or subprocess.run(["strace", "-o", os.devnull, "true"]).returncode:
        pytest.skip("strace is missing or not allowed here: the fsync order is not observable")
    lora, lora_b = fx.adapter("llama", "lora"), fx.adapter("llama", "lora_b")
    out, log = tmp_path / "out", tmp_path / "strace.log"
    assert _invoke("merge", lora, "-s", "cat", "-o", out).exit_code == 0
    calls = "trace=fsync,rename,renameat,renameat2,unlinkat"
    trace = ["strace", "-f", "-y", "-qq", "-o", str(log), "-e", calls]
    merge = ["-m", "merging_cli.main", "merge", str(lora), str(lora_b), "-s", "cat", "-o", str(out)]
    merge.append("--force")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([*trace, sys.executable, *merge], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = log.read_text().splitlines()
    swap = next(i for i, ln in enumerate(lines) if re.search(r"rename", ln) and f'"{out}"' in ln)
    synced = {m[1] for ln in lines[:swap] if (m := re.search(r"fsync\(\d+<([^>]+)>", ln))}
    tmp = next(Path(p) for p in synced if Path(p).name.startswith(".out.tmp-"))
    for name in ("adapter_config.json", "adapter_model.safetensors", "merge_recipe.json"):
        assert str(tmp / name) in synced, f"{name} not fsynced before the swap"
    after = lines[swap + 1 :]
    parent = next(i for i, ln in enumerate(after) if "fsync(" in ln and f"<{tmp_path}>" in ln)
    first_unlink = next((i for i, ln in enumerate(after) if "unlinkat(" in ln), len(after))
    assert parent < first_unlink, "the previous output was removed before the swap was made durable"


def _start(pid: int) -> str:
    return atomic._start_time(pid)


def test_stale_temp_entries_are_cleaned_and_a_live_ones_never(fx, tmp_path):
    ad = fp.read(fx.adapter("llama", "lora"))
    out = tmp_path / "out"
    fp.write(ad, out)
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = tmp_path / f".out.tmp-{gone.pid}.{_start(os.getpid())}-0000aaaa"
    live = tmp_path / f".out.tmp-{os.getpid()}.{_start(os.getpid())}-0000bbbb"
    reused = tmp_path / f".out.tmp-{os.getpid()}.1-0000cccc"  # this pid, but a process that started earlier
    for p in (dead, live, reused):
        p.mkdir()
        (p / "adapter_model.safetensors").write_bytes(b"half")
    fp.write(ad, out, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name])
    # cut between the two renames of a swap (where RENAME_EXCHANGE is missing): the old output comes back
    shutil.rmtree(live)
    before = _tree(out)
    aside = tmp_path / f".out.old-{gone.pid}.{_start(os.getpid())}-0000dddd"
    out.rename(aside)
    assert atomic.clean_stale(out) == [aside.name] and _tree(out) == before and _leftovers(tmp_path) == []


@pytest.mark.system
def test_three_concurrent_merges_into_one_output_leave_one_complete_output(fx, tmp_path):
    a = [fx.adapter("llama", k) for k in ("lora", "lora_b", "lora_r8")]
    out = tmp_path / "out"
    assert _invoke("merge", a[0], "-s", "cat", "-o", out).exit_code == 0
    mine = _plant(out)
    expected = []
    for i in range(3):
        _invoke("merge", a[i], a[(i + 1) % 3], "-s", "cat", "-o", tmp_path / f"e{i}")
        expected.append(_tree(tmp_path / f"e{i}"))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmds = [["-m", "merging_cli.main", "merge", str(a[i]), str(a[(i + 1) % 3]), "-s", "cat", "-o", str(out),
             "--force"] for i in range(3)]  # fmt: skip
    procs = [
        subprocess.Popen([sys.executable, *c], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
        for c in cmds
    ]  # fmt: skip
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    tree = _tree(out)
    assert {k: tree[k] for k in mine} == mine
    assert {k: v for k, v in tree.items() if k not in mine} in expected
    assert _leftovers(tmp_path) == []


ROOT_NOTE = "runs as root: a read-only folder does not stop root (the read-only mount test covers it)"


@pytest.mark.skipif(os.geteuid() == 0, reason=ROOT_NOTE)
def test_a_read_only_folder_is_one_line_and_keeps_the_output(fx, tmp_path):
    lora, lora_b = fx.adapter("llama", "lora"), fx.adapter("llama", "lora_b")
    folder = tmp_path / "ro"
    folder.mkdir()
    assert _invoke("merge", lora, "-s", "cat", "-o", folder / "out").exit_code == 0
    before = _tree(folder)
    folder.chmod(0o555)
    try:
        r = _invoke("merge", lora, lora_b, "-s", "cat", "-o", folder / "out", "--force")
    finally:
        folder.chmod(0o755)
    assert r.exit_code == 2 and "cannot write" in r.output and len(r.output.strip().splitlines()) == 1
    assert _tree(folder) == before


MOUNTED = textwrap.dedent(r"""
    import json, os, random, subprocess, sys
    from pathlib import Path
    from click.testing import CliRunner
    from merging_cli.main import cli

    disk, seed = Path(sys.argv[1]), int(sys.argv[4])
    args_a, args_b = json.loads(sys.argv[2]), json.loads(sys.argv[3])
    def run(args, out):
        r = CliRunner(env={"COLUMNS": "200"}).invoke(cli, [*args, "-o", str(out), "--force"])
        return r.exit_code, r.output.strip()
    def tree(p):
        files = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())
        return {str(x): x.read_bytes().hex() for x in files}
    results, rng = [], random.Random(seed)
    for name, a, b in zip(["peft", "kohya.safetensors"], args_a, args_b):
        out = disk / name
        assert run(a, out)[0] == 0
        if out.is_dir():
            (out / "NOTES.txt").write_text("mine")
        before = tree(out)
        size = sum(len(bytes.fromhex(v)) for v in before.values())
        for _ in range(3):
            st = os.statvfs(disk)
            left = rng.randrange(0, size)
            filler = disk / "filler"
            with open(filler, "wb") as f:
                f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - left))
            code, text = run(b, out)
            filler.unlink()
            leftovers = [p.name for p in disk.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
            results.append({"case": f"{name} with {left} bytes free", "code": code, "text": text,
                            "kept": tree(out) == before, "leftovers": leftovers})
    subprocess.run(["mount", "--bind", str(disk), str(disk)], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(disk)], check=True)
    for name, b in zip(["peft", "kohya.safetensors"], args_b):
        out = disk / name
        before = tree(out)
        code, text = run(b, out)
        results.append({"case": f"{name} on a read-only mount", "code": code, "text": text,
                        "kept": tree(out) == before, "leftovers": []})
    print(json.dumps(results))
""")


@pytest.mark.system
def test_a_full_disk_and_a_read_only_mount_keep_the_previous_output(fx, tmp_path):
    """ENOSPC at seeded fill levels and EROFS, in a private tmpfs mount (user + mount namespace)."""
    probe = shutil.which("unshare") and subprocess.run(["unshare", "-r", "-m", "true"], capture_output=True)
    if not probe or probe.returncode:
        pytest.skip("no private mount (unshare -r -m missing or not allowed): ENOSPC and EROFS not tested")
    disk = tmp_path / "disk"
    disk.mkdir()
    lora, lora_b = str(fx.adapter("llama", "lora")), str(fx.adapter("llama", "lora_b"))
    args_a = [["merge", lora, "-s", "cat"], ["merge", lora, "-s", "cat", "--format", "kohya"]]
    args_b = [["merge", lora, lora_b, "-s", "cat"], ["merge", lora, lora_b, "-s", "cat", "--format", "kohya"]]
    script = tmp_path / "mounted.py"
    script.write_text(MOUNTED)
    inner = f'mount -t tmpfs -o size=8m tmpfs "{disk}" && exec "$0" "$@"'
    cmd = ["unshare", "-r", "-m", "sh", "-c", inner, sys.executable, str(script), str(disk),
           json.dumps(args_a), json.dumps(args_b), "23"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(results) == 8
    for res in results:
        assert res["code"] == 2 and len(res["text"].splitlines()) == 1, res
        assert "cannot write" in res["text"], res
        assert any(why in res["text"] for why in ("No space left", "Read-only file system", "short")), res
        assert res["kept"] and res["leftovers"] == [], res


def test_without_rename_exchange_the_swap_still_keeps_the_users_files(fx, tmp_path, monkeypatch):
    """Where renameat2 is missing (not Linux, or a filesystem without it): out is moved aside, the new one
    renamed in, and a crash between the two is undone by clean_stale (test above)."""
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    fp.write(fp.read(fx.adapter("llama", "lora")), out)
    mine = _plant(out)
    new = fp.read(fx.adapter("llama", "lora_b"))
    fp.write(new, out, force=True)
    fp.write(new, tmp_path / "reference")
    tree = _tree(out)
    assert {k: tree[k] for k in mine} == mine
    assert {k: v for k, v in tree.items() if k not in mine} == _tree(tmp_path / "reference")
    assert _leftovers(tmp_path) == []
