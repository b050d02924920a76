"""Load a frozen open_clip model from a hub tag, a local file or a local folder.

Routes for ``pretrained`` (the ``--clip-pretrained`` flag; default: the
environment variable ``BILALORA_CLIP_PRETRAINED``, else ``"openai"``):

- a **tag** of ``clip`` (``openai``, ``laion400m_e32``, ...): open_clip's normal
  download into its cache (the Hugging Face hub cache, or ``~/.cache/clip`` for
  URL weights). With ``HF_HUB_OFFLINE=1`` and no cached copy it fails at once.
- a **file** (``.pt``, ``.pth``, ``.bin``, ``.safetensors``, ``.npz``): loaded
  into the ``clip`` architecture with open_clip's ``load_checkpoint`` (strict:
  every key must fit). Anything with a path separator or one of these suffixes
  is taken as a file and must exist.
- ``local-dir:DIR``: a folder with ``open_clip_config.json`` (``model_cfg``,
  ``preprocess_cfg``) and one weights file, as open_clip writes them; the
  architecture comes from the folder and ``clip`` is ignored.
- ``hf-hub:ORG/REPO``: config and weights from a hub repository (cached or online).

``clip_config`` (``--clip-config``) registers a JSON architecture with
``open_clip.add_model_config``; its file stem becomes the model name.

Weights are required on every route (``require_pretrained=True``): a model is
never silently left with random weights. Every failure is one
:class:`~bilalora.errors.UserError` line naming the ways to provide weights.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError

__all__ = [
    "DEFAULT_CLIP",
    "DEFAULT_PRETRAINED",
    "ENV_PRETRAINED",
    "LoadedClip",
    "load_clip",
    "resolve_pretrained",
    "save_random_checkpoint",
]

DEFAULT_CLIP = "ViT-B-32-quickgelu"
DEFAULT_PRETRAINED = "openai"
ENV_PRETRAINED = "BILALORA_CLIP_PRETRAINED"
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".npz", ".npy")

HOW_TO = (
    "provide CLIP weights with --clip-pretrained PATH (a .pt/.bin/.safetensors file), "
    "--clip-pretrained local-dir:DIR, the environment variable BILALORA_CLIP_PRETRAINED, "
    "or a hub tag such as 'openai' with network access (or a filled cache); "
    "or adapt without CLIP: --objective prior"
)

log = logging.getLogger("bilalora.objectives")


@dataclass
class LoadedClip:
    """A frozen CLIP model in eval mode, its tokenizer and where it came from."""

    model: Any
    tokenizer: Any
    name: str
    source: str
    route: str
    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    notes: list[str] = field(default_factory=list)


def resolve_pretrained(pretrained: str | None) -> tuple[str, str]:
    """``(value, origin)``: the argument, else ``$BILALORA_CLIP_PRETRAINED``, else ``"openai"``."""
    if pretrained not in (None, ""):
        return str(pretrained), "argument"
    env = os.environ.get(ENV_PRETRAINED, "").strip()
    if env:
        return env, f"environment {ENV_PRETRAINED}"
    return DEFAULT_PRETRAINED, "default"


def _short(err: BaseException, limit: int = 160) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def _quiet_open_clip():
    """Silence open_clip's root-logger errors while loading; our UserError says it in one line."""
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(previous)


def _register_config(clip_config: str | os.PathLike) -> str:
    import open_clip

    path = Path(clip_config).expanduser()
    if not path.is_file():
        raise UserError(f"--clip-config: no such file {path}")
    if path.suffix != ".json":
        raise UserError(f"--clip-config: {path} must be a .json open_clip model config (its stem is the model name)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"--clip-config: {path} is not valid JSON ({_short(err)})") from None
    missing = [key for key in ("embed_dim", "vision_cfg", "text_cfg") if not isinstance(cfg, dict) or key not in cfg]
    if missing:
        raise UserError(f"--clip-config: {path} lacks {', '.join(missing)} (an open_clip model config needs "
                        "embed_dim, vision_cfg and text_cfg)")
    open_clip.add_model_config(path)
    return path.stem


def _resolve_name(clip: str | None, clip_config) -> tuple[str, list[str]]:
    notes: list[str] = []
    if clip_config is not None:
        stem = _register_config(clip_config)
        if clip not in (None, "", DEFAULT_CLIP, stem):
            raise UserError(f"--clip {clip} does not match --clip-config {clip_config}: the config registers the "
                            f"model name '{stem}' (its file stem); drop --clip or rename the file")
        if clip == DEFAULT_CLIP and stem != DEFAULT_CLIP:
            notes.append(f"--clip-config registers '{stem}', used instead of the default {DEFAULT_CLIP}")
        return stem, notes
    return (clip or DEFAULT_CLIP).replace("/", "-"), notes


def _looks_like_file(value: str) -> bool:
    return (os.sep in value or "/" in value or value.startswith(("~", "."))
            or value.lower().endswith(WEIGHT_SUFFIXES) or os.path.exists(value))


def _fail(where: str, why: str) -> UserError:
    return UserError(f"CLIP weights could not be loaded from {where}: {why}; {HOW_TO}")


def load_clip(
    clip: str | None = None,
    pretrained: str | None = None,
    clip_config: str | os.PathLike | None = None,
    device: str = "cpu",
    cache_dir: str | None = None,
) -> LoadedClip:
    """Create an open_clip model with real weights, frozen and in eval mode.

    Args:
        clip: architecture name (``--clip``), e.g. ``ViT-B-32-quickgelu``; None =
            the default, or the stem of ``clip_config`` when that is given.
        pretrained: tag, weights file, ``local-dir:DIR`` or ``hf-hub:ORG/REPO``;
            None = ``$BILALORA_CLIP_PRETRAINED`` or ``openai``.
        clip_config: JSON model config to register first (``--clip-config``).
        device: where to put the model.
        cache_dir: open_clip download cache (None = its default).

    Returns:
        :class:`LoadedClip`; every parameter has ``requires_grad=False``.

    Raises:
        UserError: one line on any failure (unknown model or tag, missing or
            unreadable file, a checkpoint that does not fit, hub unreachable).
    """
    import open_clip
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    name, notes = _resolve_name(clip, clip_config)
    value, origin = resolve_pretrained(pretrained)
    from_env = origin.startswith("environment")
    kwargs: dict[str, Any] = {"device": device, "require_pretrained": True, "cache_dir": cache_dir}

    if value.startswith(("local-dir:", "hf-hub:")):
        route = "local-dir" if value.startswith("local-dir:") else "hf-hub"
        model_name, tokenizer_name = value, value
        if route == "local-dir":
            folder = Path(value[len("local-dir:"):]).expanduser()
            value = model_name = tokenizer_name = f"local-dir:{folder}"
            if not folder.is_dir():
                raise _fail(value, "no such folder")
            if not (folder / "open_clip_config.json").is_file():
                raise _fail(value, "the folder has no open_clip_config.json")
            if not any(any(folder.glob(pattern)) for pattern in ("*.safetensors", "*.bin", "*.pth")):
                raise _fail(value, "the folder has no .safetensors/.bin/.pth weights")
        if clip not in (None, "", DEFAULT_CLIP) or clip_config is not None:
            notes.append(f"{route} supplies its own architecture; --clip/--clip-config ignored")
        create_args: tuple = (model_name,)
    elif _looks_like_file(value):
        route = "file"
        path = Path(value).expanduser()
        if not path.is_file():
            where = f"{value} (from ${ENV_PRETRAINED})" if from_env else value
            raise _fail(where, "no such file")
        value = str(path)
        model_name, tokenizer_name = name, name
        _check_known(name)
        create_args = (name,)
        kwargs["pretrained"] = value
    else:
        route = "tag"
        _check_known(name)
        tags = open_clip.list_pretrained_tags_by_model(name)
        if not open_clip.get_pretrained_cfg(name, value):
            raise UserError(
                f"--clip-pretrained {value}: not a file and not a known tag of {name} "
                f"(tags: {', '.join(tags) or 'none'}); {HOW_TO}"
            )
        tag_cfg = open_clip.get_pretrained_cfg(name, value)
        if tag_cfg.get("quick_gelu", False) and not open_clip.get_model_config(name).get("quick_gelu", False):
            kwargs["force_quick_gelu"] = True
            notes.append(f"QuickGELU forced: the '{value}' weights were trained with it")
        model_name, tokenizer_name = name, name
        create_args = (name,)
        kwargs["pretrained"] = value

    try:
        with _quiet_open_clip():
            if route == "file" and _is_torchscript(value):
                route = "file (TorchScript)"
                model = _load_torchscript(name, value, device)
            else:
                model = open_clip.create_model(*create_args, **kwargs)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - any loader failure becomes one line
        hint = ""
        if route in ("tag", "hf-hub") and os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
            hint = " (HF_HUB_OFFLINE is set and the weights are not cached)"
        elif route.startswith("file"):
            hint = f" (does the file fit the architecture {name}? choose it with --clip or --clip-config)"
        raise _fail(f"{route} '{value}'", _short(err) + hint) from None

    try:
        tokenizer = open_clip.get_tokenizer(tokenizer_name)
    except Exception as err:  # noqa: BLE001
        raise UserError(f"CLIP tokenizer for {tokenizer_name} could not be created: {_short(err)}") from None

    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)

    cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    size = getattr(model.visual, "image_size", None) or cfg.get("size", 224)
    size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    mean = tuple(float(v) for v in cfg.get("mean", OPENAI_DATASET_MEAN))
    std = tuple(float(v) for v in cfg.get("std", OPENAI_DATASET_STD))
    source = value if origin == "argument" else f"{value} ({origin})"
    for note in notes:
        log.info(note)
    return LoadedClip(model=model, tokenizer=tokenizer, name=name if route.startswith(("tag", "file")) else value,
                      source=source, route=route, image_size=size, mean=mean, std=std, notes=notes)


def _is_torchscript(path: str) -> bool:
    """True for a TorchScript archive (OpenAI's original ViT-B-32.pt is one)."""
    import zipfile

    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as archive:
            return any(n.endswith("constants.pkl") for n in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _load_torchscript(name: str, path: str, device: str):
    """Build ``name`` and load the state dict of a TorchScript CLIP archive into it (strict).

    open_clip 3.3 loads files with ``torch.load(weights_only=True)``, which refuses
    TorchScript archives such as OpenAI's original ``ViT-B-32.pt``.
    """
    import warnings

    import open_clip
    import torch
    from open_clip.factory import resize_pos_embed, resize_text_pos_embed

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.load(path, map_location="cpu")
    state = dict(scripted.state_dict())
    del scripted
    model = open_clip.create_model(name, pretrained=None, device="cpu")
    drop = {"input_resolution", "context_length", "vocab_size"} | set(_non_persistent(model))
    state = {k: v for k, v in state.items() if k not in drop}
    if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    resize_pos_embed(state, model)
    resize_text_pos_embed(state, model)
    model.load_state_dict(state, strict=True)
    return model.to(device)


def _non_persistent(model):
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for buf in getattr(module, "_non_persistent_buffers_set", ()):
            yield prefix + buf


def _check_known(name: str) -> None:
    import open_clip

    if open_clip.get_model_config(name) is None:
        raise UserError(
            f"--clip {name}: unknown open_clip architecture; pick one of open_clip.list_models() "
            "(e.g. ViT-B-32-quickgelu) or register a JSON config with --clip-config"
        )


def save_random_checkpoint(path: str | os.PathLike, clip: str = DEFAULT_CLIP,
                           clip_config: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """Write a **randomly initialised** ``clip`` state dict to ``path`` (for timing tests only).

    ``.safetensors`` paths are written with safetensors, anything else with
    ``torch.save``. Load it back with ``pretrained=path``. The result has the
    cost of the real model and none of its meaning: never adapt with it.
    """
    import open_clip
    import torch

    name, _ = _resolve_name(clip, clip_config)
    _check_known(name)
    torch.manual_seed(seed)
    with _quiet_open_clip():
        model = open_clip.create_model(name, pretrained=None)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(tmp))
    else:
        torch.save(state, tmp)
    os.replace(tmp, path)
    return path
