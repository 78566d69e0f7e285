"""The Hub both ways, the real huggingface_hub client against a loopback server (tests/support/hubserver.py).

The CLI runs in a subprocess with HF_ENDPOINT, HF_HUB_CACHE and HF_TOKEN set, as a user would run it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from merging.merge.recipe import Recipe
from tests.support.hubserver import HubServer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def hub(tmp_path):
    server = HubServer()
    yield server
    server.close()


def _cli(hub, tmp_path, *args, offline=False, token="hf_test_token"):
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HUB_CACHE=str(tmp_path / "hf-cache"), COLUMNS="200",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HOME=str(tmp_path / "hf-home"),
               HF_HUB_DISABLE_XET="1")  # fmt: skip  (the loopback Hub offers LFS, not xet)
    env.pop("HF_HUB_OFFLINE", None)
    if token:
        env["HF_TOKEN"] = token
    else:
        env.pop("HF_TOKEN", None)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    cmd = [sys.executable, "-m", "merging_cli.main", *(str(a) for a in args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)


def _seed(hub, repo_id, folder: Path, branch="main", sub=None, message="add adapter"):
    files = {(f"{sub}/" if sub else "") + p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    return hub.state.add_commit(repo_id, branch, files, message)


def test_publish_sends_the_folder_and_a_valid_model_card(hub, tmp_path, fx):
    from huggingface_hub import ModelCard

    a, b = fx.adapter("llama", "lora"), fx.adapter("llama", "lokr")
    out = tmp_path / "merged"
    r = _cli(hub, tmp_path, "merge", a, b, "-s", "cat", "-w", "1,0.5", "-o", out)
    assert r.returncode == 0, r.stderr
    r = _cli(hub, tmp_path, "verify", "--base", fx.base("llama"), a, b, "--merged", out, "-w", "1,0.5",
             "--save", out / "verify_report.json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    dry = _cli(hub, tmp_path, "publish", out, "--repo", "alice/merged", "--dry-run")
    assert dry.returncode == 0 and "nothing was sent" in dry.stdout and hub.state.requests == []
    r = _cli(
        hub, tmp_path, "publish", out, "--repo", "alice/merged", "--revision", "v1", "--message", "merged!"
    )
    assert r.returncode == 0, r.stderr
    repo = hub.state.repos["alice/merged"]
    files = repo.commits[repo.branches["v1"]]
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors", "merge_recipe.json"} <= set(
        files
    )
    assert files["adapter_model.safetensors"] == (out / "adapter_model.safetensors").read_bytes()
    assert repo.messages[repo.branches["v1"]] == "merged!"
    assert all(auth == "Bearer hf_test_token" for _, _, auth in hub.state.requests)
    card_path = tmp_path / "README.md"
    card_path.write_bytes(files["README.md"])
    card = ModelCard.load(card_path)
    data = card.data.to_dict()
    assert data["library_name"] == "peft" and {"merging", "lora", "lokr"} <= set(data["tags"])
    assert "| lora |" in card.text and "| 0.5 |" in card.text and "Strategy: `cat`" in card.text
    assert "## Verification" in card.text and "PASS" in card.text
    recipe = json.loads(files["merge_recipe.json"])
    assert recipe["strategy"] == "cat" and [i["weight"] for i in recipe["inputs"]] == [1.0, 0.5]


def test_publish_refuses_a_folder_that_is_not_an_adapter(hub, tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    r = _cli(hub, tmp_path, "publish", tmp_path / "junk", "--repo", "alice/junk")
    assert r.returncode == 2 and "not an adapter" in r.stderr and "Traceback" not in r.stderr
    assert "alice/junk" not in hub.state.repos


def test_download_by_revision_and_subfolder_records_the_commit(hub, tmp_path, fx):
    v1 = _seed(hub, "alice/math", fx.adapter("llama", "lora"), branch="v1")
    sha_b = _seed(hub, "bob/many", fx.adapter("llama", "loha"), sub="loha")
    out = tmp_path / "m"
    base = fx.base("llama")  # the LoHa's flat factors do not say the layer kind; the adapters name no base
    r = _cli(hub, tmp_path, "merge", "alice/math@v1", "bob/many:loha", "-s", "cat", "--base", base, "-o", out)
    assert r.returncode == 0, r.stderr
    recipe = json.loads((out / "merge_recipe.json").read_text())
    assert Recipe.from_dict(recipe).to_dict() == recipe
    hubs = [i["hub"] for i in recipe["inputs"]]
    assert hubs[0]["repo"] == "alice/math" and hubs[0]["revision"] == v1
    assert hubs[1]["subfolder"] == "loha" and hubs[1]["revision"] == sha_b
    # offline: the cache serves the same ids; a miss is one clear line
    r = _cli(hub, tmp_path, "inspect", "alice/math@v1", "--modules", offline=True)
    assert r.returncode == 0 and "model.layers.0.self_attn.q_proj" in r.stdout
    r = _cli(hub, tmp_path, "inspect", "carol/never", offline=True)
    assert (
        r.returncode == 2
        and "not in the local Hub cache" in r.stderr
        and len(r.stderr.strip().splitlines()) == 1
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nobody/missing", "no such repository"),
        ("alice/math@nope", "no revision 'nope'"),
        ("../etc/passwd", "no such file or folder"),
        ("alice/../../etc", "not a local path nor a Hub id"),
        ("alice/math:../../secret", "not a local path nor a Hub id"),
        ("gated/model", "gated"),
    ],
)
def test_hub_errors_are_one_line(hub, tmp_path, fx, spec, message):
    _seed(hub, "alice/math", fx.adapter("llama", "lora"))
    _seed(hub, "gated/model", fx.adapter("llama", "lora"))
    hub.state.repos["gated/model"].gated = True
    r = _cli(hub, tmp_path, "inspect", spec)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr


def test_publish_over_an_earlier_one_keeps_the_repos_other_files_in_one_commit(hub, tmp_path, fx):
    """Files someone else put in the repo stay; the adapter files an earlier publish left (an IA³ + LoRA
    stack here) go; the whole publish is one commit."""
    old = tmp_path / "old"
    assert _cli(hub, tmp_path, "merge", fx.adapter("llama", "ia3"), fx.adapter("llama", "lora"), "-s", "cat",
                "-o", old).returncode == 0  # fmt: skip
    assert _cli(hub, tmp_path, "publish", old, "--repo", "alice/m").returncode == 0
    hub.state.add_commit("alice/m", "main", {"NOTES.md": b"mine", "eval/scores.jsonl": b"{}\n"}, "notes")
    repo = hub.state.repos["alice/m"]
    before = len(repo.commits)
    assert {"merging_stack.json", "ia3/adapter_config.json", "lora/adapter_model.safetensors"} <= set(
        repo.commits[repo.branches["main"]]
    )
    new = tmp_path / "new"
    lora, lora_b = fx.adapter("llama", "lora"), fx.adapter("llama", "lora_b")
    assert _cli(hub, tmp_path, "merge", lora, lora_b, "-s", "cat", "-o", new).returncode == 0
    r = _cli(hub, tmp_path, "publish", new, "--repo", "alice/m")
    assert r.returncode == 0, r.stderr
    files = repo.commits[repo.branches["main"]]
    assert len(repo.commits) == before + 1
    assert files["NOTES.md"] == b"mine" and files["eval/scores.jsonl"] == b"{}\n"
    adapter = {"README.md", "adapter_config.json", "adapter_model.safetensors", "merge_recipe.json"}
    assert set(files) == {".gitattributes", "NOTES.md", "eval/scores.jsonl"} | adapter
    assert files["adapter_model.safetensors"] == (new / "adapter_model.safetensors").read_bytes()


@pytest.mark.system
def test_a_publish_killed_mid_upload_leaves_the_previous_revision_whole(hub, tmp_path, fx):
    import signal
    import threading

    out = tmp_path / "m"
    assert _cli(hub, tmp_path, "merge", fx.adapter("llama", "lora"), "-s", "cat", "-o", out).returncode == 0
    _seed(hub, "alice/m", fx.adapter("llama", "lora_b"))
    repo = hub.state.repos["alice/m"]
    head, old_files = repo.branches["main"], dict(repo.commits[repo.branches["main"]])
    hub.state.hold = threading.Event()
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HUB_CACHE=str(tmp_path / "hf-cache"), HF_TOKEN="hf_test",
               HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1")  # fmt: skip
    env.pop("HF_HUB_OFFLINE", None)
    cmd = [sys.executable, "-m", "merging_cli.main", "publish", str(out), "--repo", "alice/m"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert hub.state.committing.wait(timeout=120), "the publish never reached its commit"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        hub.state.hold.set()
        hub.state.hold = None
    time_left = 50
    while time_left and any(t.name != "MainThread" and t.is_alive() and "process_request" in t.name
                            for t in threading.enumerate()):  # fmt: skip
        time_left -= 1
        threading.Event().wait(0.1)
    files = repo.commits[repo.branches["main"]]
    assert repo.branches["main"] == head and files == old_files or (
        files["adapter_model.safetensors"] == (out / "adapter_model.safetensors").read_bytes()
        and "README.md" in files and "merge_recipe.json" in files
    )
    r = _cli(hub, tmp_path, "publish", out, "--repo", "alice/m")
    assert r.returncode == 0, r.stderr
    files = repo.commits[repo.branches["main"]]
    assert files["adapter_model.safetensors"] == (out / "adapter_model.safetensors").read_bytes()


def test_a_real_sized_adapter_goes_through_lfs_byte_identical(hub, tmp_path):
    """A 34 MB adapter takes huggingface_hub's large-file path (preupload → LFS batch → PUT → commit)."""
    import torch

    from merging.core.adapter import Adapter
    from merging.core.deltas import LowRank, Target
    from merging.formats import peft as peft_format

    g = torch.Generator().manual_seed(0)
    deltas = {
        f"model.layers.{i}.mlp.down_proj": LowRank(
            torch.randn(2048, 64, generator=g),  # (out, r)
            torch.randn(64, 8192, generator=g),  # (r, in): 2.6 MB a module in float32
            0.5, Target("linear", (2048, 8192)),
        )
        for i in range(13)
    }
    out = peft_format.write(Adapter("big", deltas, base_model="org/base"), tmp_path / "big")
    weights = (out / "adapter_model.safetensors").read_bytes()
    assert len(weights) >= 30 * 2**20
    r = _cli(hub, tmp_path, "publish", out, "--repo", "alice/big")
    assert r.returncode == 0, r.stderr
    repo = hub.state.repos["alice/big"]
    files = repo.commits[repo.branches["main"]]
    assert files["adapter_model.safetensors"] == weights
    lfs = [p for m, p, _ in hub.state.requests if m == "PUT" and p.startswith("/lfs-upload/")]
    batch = [p for m, p, _ in hub.state.requests if p.endswith(".git/info/lfs/objects/batch")]
    assert len(lfs) == 1 and len(batch) == 1  # the weights went through LFS, the small files did not
