"""The Hub both ways, with the real huggingface_hub client against a loopback server (tests/hubserver.py).

The CLI runs in a subprocess with HF_ENDPOINT, HF_HUB_CACHE and HF_TOKEN set, as a user would run it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from merging.recipe import Recipe
from tests.hubserver import HubServer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def hub(tmp_path):
    server = HubServer()
    yield server
    server.close()


def _cli(hub, tmp_path, *args, offline=False, token="hf_test_token"):
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HUB_CACHE=str(tmp_path / "hf-cache"), COLUMNS="200",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HOME=str(tmp_path / "hf-home"))  # fmt: skip
    env.pop("HF_HUB_OFFLINE", None)
    if token:
        env["HF_TOKEN"] = token
    else:
        env.pop("HF_TOKEN", None)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    cmd = [sys.executable, "-m", "cli.main", *(str(a) for a in args)]
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
    r = _cli(hub, tmp_path, "merge", "alice/math@v1", "bob/many:loha", "-s", "cat", "-o", out)
    assert r.returncode == 0, r.stderr
    recipe = json.loads((out / "merge_recipe.json").read_text())
    assert Recipe.from_dict(recipe).to_dict() == recipe
    hubs = [i["hub"] for i in recipe["inputs"]]
    assert hubs[0]["repo"] == "alice/math" and hubs[0]["revision"] == v1
    assert hubs[1]["subfolder"] == "loha" and hubs[1]["revision"] == sha_b
    # offline: the cache serves the same ids; a miss is one clear line
    r = _cli(hub, tmp_path, "inspect", "alice/math@v1", offline=True)
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
