"""Loading a VLM and its processor, offline-friendly, with clear errors.

`load("organism")` loads the project's own trained model organism shipped in
the package; anything else goes through the real `from_pretrained` (a hub id
or a local folder). The language backbone is switched to the "gaze_sdpa"
attention (see `attention`), which computes exactly what SDPA computes until
a hook is active.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from gaze.attention import prepare
from gaze.errors import GazeError, ModelNotFoundError, is_hub_id
from gaze.families import IMAGE_ONLY_PROCESSORS, Family, UnsupportedModelError, family_of, register_image_only_processors

ORGANISM_DIR = Path(__file__).parent / "organism" / "weights"
SHORT_NAMES = {"organism": ORGANISM_DIR}

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class Loaded:
    """A model ready for gaze: model, processor, family and the id it was loaded from."""

    model: torch.nn.Module
    processor: object
    family: Family
    model_id: str

    @property
    def n_layers(self) -> int:
        return int(self.family.text_config(self.model).num_hidden_layers)

    @property
    def n_heads(self) -> int:
        return int(self.family.text_config(self.model).num_attention_heads)

    @property
    def prompts(self):
        """The questions to ask this model (`gaze.prompts.Prompts`): those its folder records in
        `prompts.json` (the model organism's), else the paper's."""
        from gaze.prompts import Prompts

        folder = Path(resolve(self.model_id)) if self.model_id in SHORT_NAMES else Path(self.model_id)
        return Prompts.for_model(folder if folder.is_dir() else None)


def resolve(name_or_path: str) -> str:
    """A short name ('organism') -> its folder; anything else unchanged."""
    if name_or_path in SHORT_NAMES:
        folder = SHORT_NAMES[name_or_path]
        if not (folder / "config.json").exists():
            raise ModelNotFoundError(
                f"the model organism is not at {folder}: train it with the commands in gaze/organism/train.py "
                "or pass --model with a hub id or folder"
            )
        return str(folder)
    return name_or_path


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def check_hub_model(repo_id: str, revision: str | None = None) -> None:
    """Fail fast, in one line, for a hub id that is not in the local cache and cannot be fetched: offline
    (HF_HUB_OFFLINE), the Hub unreachable, or no such repo; `from_pretrained` would retry for half a minute."""
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str):
        return  # cached: from_pretrained reads it from disk
    if _offline():
        raise ModelNotFoundError(f"model {repo_id} (--model): no such folder here, and the hub id is not in the local cache "
                                 "while HF_HUB_OFFLINE is set; give a local folder, or download it online first")
    try:
        HfApi().model_info(repo_id, revision=revision, timeout=10)
    except GatedRepoError:
        return  # exists; from_pretrained reports the access problem with the token it uses
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"model {repo_id} (--model): no such folder here, and no such model on the Hub (a private "
                                 "one needs HF_TOKEN); check the name") from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"model {repo_id} (--model): the Hub has no revision {revision!r} of it") from None
    except Exception as e:  # noqa: BLE001 - network errors of whichever HTTP client the Hub library uses
        raise ModelNotFoundError(f"model {repo_id} (--model): no such folder here, and the Hub cannot be reached "
                                 f"({str(e).splitlines()[0][:120]}); give a local folder, or a hub id in the local "
                                 "cache with HF_HUB_OFFLINE=1") from None


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise GazeError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_processor(path: str, config, revision: str | None):
    """The checkpoint's processor; without torchvision, the stock Qwen-VL processors cannot build their
    video processor, so fall back to the image-only subclass of the same family (same tokenizer and
    image processor, no video)."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path, revision=revision)
    except (ImportError, ValueError, OSError) as e:
        image_only = IMAGE_ONLY_PROCESSORS.get(getattr(config, "model_type", ""))
        if image_only is None:
            raise UnsupportedModelError(f"cannot load the processor of {path!r}: {e}") from None
        return image_only[1].from_pretrained(path, revision=revision)


def load(
    name_or_path: str,
    *,
    device: str | None = None,
    dtype: str | torch.dtype = "float32",
    device_map: str | None = None,
    attn_implementation: str = "sdpa",
    revision: str | None = None,
) -> Loaded:
    """Load a supported VLM and its processor.

    `device_map="auto"` spreads a large checkpoint over all visible GPUs
    (Accelerate); otherwise the model goes to `device` (default: cuda if present).
    `attn_implementation="eager"` loads a copy for reference computations only.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor


    register_image_only_processors()  # for checkpoints saved with them, and stock ones that need torchvision
    path = resolve(name_or_path)
    local = Path(path).exists()
    if not local and not is_hub_id(path):
        raise ModelNotFoundError(f"model {path} (--model): no such folder here, and it is neither a hub id OWNER/NAME nor a "
                                 f"short name ({', '.join(SHORT_NAMES)})")
    if not local:
        check_hub_model(path, revision)
    try:
        config = AutoConfig.from_pretrained(path, revision=revision)
    except OSError as e:
        raise ModelNotFoundError(
            f"cannot load a model config from {path!r}: give a local folder, a hub id reachable from this machine, "
            f"or a short name ({', '.join(SHORT_NAMES)}). ({str(e).splitlines()[0]})"
        ) from None
    family = family_of(config)  # raises for text-only models and unknown families
    torch_dtype = resolve_dtype(dtype)
    kwargs = dict(dtype=torch_dtype, attn_implementation=attn_implementation, revision=revision)
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    except ValueError as e:
        raise UnsupportedModelError(f"{path!r} does not load as a vision-language model: {e}") from None
    if device_map is None:
        model.to(device or default_device())
    model.eval()
    processor = _load_processor(path, config, revision)
    if not hasattr(processor, "image_processor"):
        raise UnsupportedModelError(f"{path!r} has no image processor: gaze needs a VLM processor")
    if attn_implementation == "sdpa":
        prepare(model)
    return Loaded(model=model, processor=processor, family=family, model_id=name_or_path)
