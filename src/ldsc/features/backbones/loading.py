"""Load pretrained parts from a Hugging Face model id or a local directory, one way for all.

Every failure to get the files (no such directory, hub unreachable or offline, gated or missing
repository, missing subfolder) becomes one :class:`~ldsc.features.backbones.base.WeightsNotFoundError`
whose message names the id, the cache directory and how to provide the files.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import logging
import os
import warnings
from typing import Any

from ldsc.features.backbones.base import weights_error

logger = logging.getLogger(__name__)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether a TCP connection to the Hugging Face hub (``$HF_ENDPOINT``) opens within ``timeout``
    seconds. Behind a proxy (``HTTPS_PROXY`` / ``ALL_PROXY``) the answer is left to the libraries
    (``True``). Asked once per process: without it an offline machine spends ~20 s in the hub
    client's retries, each warning printed, before the one sentence that matters."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
        return True
    except (OSError, ValueError):
        return False


def load_pretrained(
    cls: Any,
    model_id: str,
    *,
    cache_dir: str | None = None,
    subfolder: str | None = None,
    weights: bool = True,
    method: str = "from_pretrained",
    **kwargs,
):
    """``cls.from_pretrained(model_id, ...)`` that fails with one clear sentence.

    ``model_id`` is a hub id or a local directory. With ``HF_HUB_OFFLINE=1``, or when the hub
    cannot be reached (:func:`hub_reachable`), only the local cache is consulted
    (``local_files_only=True``), so a missing model fails at once instead of after network
    time-outs and retries. The libraries' load reports and progress bars
    are silenced (checkpoints routinely hold parts we do not load: the text tower of CLIP,
    the MAE decoder, the DINO pooler); for models (``weights=True``) weights *missing* from
    the checkpoint are still reported, in one logged line. ``method``: another loader of ``cls``
    with the same arguments (``load_config``).
    """
    import pickle

    from huggingface_hub.errors import EntryNotFoundError
    from safetensors import SafetensorError

    model_id = str(model_id)
    if not os.path.isdir(model_id) and _offline():
        kwargs.setdefault("local_files_only", True)
    elif not os.path.isdir(model_id) and not kwargs.get("local_files_only") and not hub_reachable():
        logger.info("the Hugging Face hub cannot be reached: looking for '%s' in the local cache only", model_id)
        kwargs["local_files_only"] = True
    if subfolder:
        kwargs["subfolder"] = subfolder
    if weights:
        kwargs["output_loading_info"] = True
    library = cls.__module__.split(".")[0]
    try:
        with _quiet(library):
            loaded = getattr(cls, method)(model_id, cache_dir=cache_dir, **kwargs)
    except (OSError, ValueError, EntryNotFoundError, SafetensorError, pickle.UnpicklingError) as err:  # OSError: the hub's HTTP errors
        raise weights_error(model_id, cache_dir, err) from err
    if not weights:
        return loaded
    model, info = loaded
    missing = list(info.get("missing_keys") or [])
    if missing:
        logger.warning(
            "%d weights of %s were not found in '%s' and are randomly initialised (e.g. %s)",
            len(missing), cls.__name__, model_id, sorted(missing)[0],
        )
    return model


@contextlib.contextmanager
def _quiet(library: str):
    """Temporarily lower ``transformers`` and ``diffusers`` logging to errors and hide their
    progress bars (a diffusers pipeline loads transformers text encoders, so both, whichever
    library ``cls`` belongs to)."""
    saved = []
    for name in dict.fromkeys((library, "transformers", "diffusers")):
        try:
            lib_logging = importlib.import_module(f"{name}.utils.logging")
        except ImportError:
            continue
        saved.append((lib_logging, lib_logging.get_verbosity(), lib_logging.is_progress_bar_enabled()))
        lib_logging.set_verbosity_error()
        lib_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():  # diffusers still passes an argument the hub deprecated
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated.*", category=FutureWarning)
            yield
    finally:
        for lib_logging, verbosity, bars in saved:
            lib_logging.set_verbosity(verbosity)
            if bars:
                lib_logging.enable_progress_bar()


def read_config_file(model_id: str, filename: str, cache_dir: str | None = None) -> dict | None:
    """A small JSON file (e.g. ``preprocessor_config.json``) from a local directory or the
    local Hugging Face cache, never from the network; ``None`` when it is not there."""
    path = os.path.join(str(model_id), filename)
    if not os.path.isdir(str(model_id)):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(str(model_id), filename, cache_dir=cache_dir)
        except (OSError, ValueError):  # not a valid repo id
            cached = None
        path = cached if isinstance(cached, str) else ""
    if not path or not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def resolve_dtype(dtype) -> "torch.dtype":
    """``"float32" | "float16" | "bfloat16"`` (or a ``torch.dtype``) → ``torch.dtype``."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if str(dtype) not in names:
        raise ValueError(f"dtype must be one of {sorted(names)}, got {dtype!r}")
    return names[str(dtype)]
