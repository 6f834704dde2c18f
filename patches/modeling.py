"""PreTrainedModel.from_pretrained: load where and how the Apple GPU can train, whatever the script asked.

Corrects, at the library call and not by the script's argument names, so any script gets it:
- `torch_dtype`/`dtype` bfloat16 (upstream's `--torch_dtype bfloat16`): MPS has no bf16 before torch 2.3 / macOS 14,
  and with fp32 compute a half-precision base cannot feed fp32 trainable modules: the plan's weights dtype instead.
- an integer or CUDA `device_map` (upstream's `{"": int(LOCAL_RANK)}`) means CUDA:0 ("Torch not compiled with CUDA
  enabled"; "Cannot access accelerator device when none is available" from torch 2.5): the Apple GPU instead.
- `attn_implementation="flash_attention_2"` (flash-attn has no macOS build): `sdpa`.
- bitsandbytes 4/8-bit (`quantization_config`, `load_in_4bit`, `load_in_8bit`): kept only where the installed
  bitsandbytes runs on MPS (0.50+, its MPS backend, with torch 2.9+), else loaded in 16 bits with one line.
- `use_auth_token`, removed in transformers 5.0 (TypeError from the model's __init__): `token`, on every machine.
Under `mps-shim plan` only, a local model folder with a config and no weight files (downloaded without them, to ask
"will it fit?") is built from its config on the meta device: no memory, no weights; shim/sizing.py and the preflight
size it, calibrated on a small real-weight twin of the same architecture (`scaled_twin`).
Versions: transformers 4.40-5.x.
"""
from __future__ import annotations

import os

from mps_shim.registry import Patch

CUDA_DEVICE_PREFIXES = ("cuda",)
QUANTIZATION_KEYS = ("quantization_config", "load_in_4bit", "load_in_8bit")
# What transformers loads weights from (single files, shards and their indexes); tokenizer files are none of these.
WEIGHT_FILE_ENDINGS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")


def is_cuda_placement(value) -> bool:
    """An integer device or a CUDA device name: what `device_map={"": 0}` and friends mean."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    text = str(value)
    return text.startswith(CUDA_DEVICE_PREFIXES) or text.isdigit()


def rewrite_device_map(device_map, device: str):
    """The same map with every CUDA placement on `device`; None when nothing changes."""
    if isinstance(device_map, dict):
        if any(is_cuda_placement(v) for v in device_map.values()):
            return {k: (device if is_cuda_placement(v) else v) for k, v in device_map.items()}
        return None
    if device_map is not None and is_cuda_placement(device_map):
        return {"": device}
    return None


def config_only_folder(args: tuple, kwargs: dict) -> str | None:
    """The local folder a from_pretrained call loads, when it has a config.json and no weight file; else None."""
    path = args[0] if args else kwargs.get("pretrained_model_name_or_path")
    if not isinstance(path, (str, os.PathLike)):
        return None
    folder = os.fspath(path)
    if kwargs.get("subfolder"):
        folder = os.path.join(folder, kwargs["subfolder"])
    if not os.path.isfile(os.path.join(folder, "config.json")):
        return None
    return None if any(name.endswith(WEIGHT_FILE_ENDINGS) for name in os.listdir(folder)) else folder


def build_from_config(cls, config, dtype, meta: bool, attn_implementation=None):
    """`cls` built from `config` in `dtype` as from_pretrained builds it before loading weights (the dtype is the
    default dtype while modules are made, so fp32 buffers such as RoPE's stay fp32): on the meta device, or with
    freshly initialised real weights on the CPU."""
    import contextlib

    import torch

    options = {dtype_keyword(): dtype}
    if attn_implementation is not None:
        options["attn_implementation"] = attn_implementation
    with torch.device("meta") if meta else contextlib.nullcontext():
        model = cls._from_config(config, **options)
    return model.eval()


def dtype_keyword() -> str:
    """from_pretrained's and _from_config's dtype argument: `torch_dtype` in transformers 4.x, `dtype` from 5.0."""
    import transformers

    return "torch_dtype" if int(transformers.__version__.split(".")[0]) < 5 else "dtype"


def scaled_twin(model, overrides: dict, device, checkpointing: bool | None = None):
    """A model of the same architecture as `model` (a transformers model built on the meta device, possibly wrapped by
    peft) with real weights, its config changed by `overrides` (fewer layers, narrower): the same adapter, the same
    trainable set and dtypes by parameter name, the same checkpointing (unless `checkpointing` says), on `device`.
    What the preflight measures when the model itself has no weights (shim/sizing.py carries the measurement over)."""
    import copy

    import torch

    from mps_shim.models import enable_checkpointing, is_checkpointing

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = copy.deepcopy(base.config)
    for key, value in overrides.items():
        setattr(config, key, value)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[: config.num_hidden_layers]
    if getattr(config, "pad_token_id", None) is not None and config.pad_token_id >= config.vocab_size:
        config.pad_token_id = None
    frozen = [p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        twin = build_from_config(
            type(base), config, frozen[0] if frozen else torch.float32, False,
            getattr(config, "_attn_implementation", None),
        )
        adapters = getattr(model, "peft_config", None)
        if adapters:
            import peft

            active = getattr(model, "active_adapter", "default")
            active = active[0] if isinstance(active, (list, tuple)) else active
            twin = peft.get_peft_model(twin, copy.deepcopy(adapters[active]))
    originals = dict(model.named_parameters())
    for name, parameter in twin.named_parameters():
        original = originals.get(name)
        if original is not None:
            parameter.requires_grad_(original.requires_grad)
            if parameter.is_floating_point() and parameter.dtype != original.dtype:
                parameter.data = parameter.data.to(original.dtype)
    if is_checkpointing(model) if checkpointing is None else checkpointing:
        enable_checkpointing(twin)
    return twin.to(device)


def bitsandbytes_runs_on_mps(facts) -> bool:
    from mps_shim.versions import compare, installed_version

    if facts.simulated:
        return False  # the simulated GPU computes on the CPU: bitsandbytes' MPS kernels cannot be exercised there
    return compare(installed_version("bitsandbytes"), ">=", "0.50") and compare(facts.torch, ">=", "2.9")


class FromPretrainedPatch(Patch):
    target = "transformers.modeling_utils"
    distribution = "transformers"
    supported = ">=4.40,<6"
    corrects = "bf16 weights, CUDA device_map, flash-attention, bitsandbytes and use_auth_token at model load"

    def apply(self, module) -> None:
        from mps_shim.versions import compare, module_version

        self.accepts_use_auth_token = compare(module_version(module), "<", "5.0.0.dev0")
        self.wrap(module.PreTrainedModel, "from_pretrained", self._from_pretrained)

    def _from_pretrained(self, wrapped, cls, args, kwargs):
        kwargs = dict(kwargs)
        change = self.runtime.report.change
        if "use_auth_token" in kwargs and not self.accepts_use_auth_token:
            token = kwargs.pop("use_auth_token")
            if token is not None:
                kwargs.setdefault("token", token)
            change("from_pretrained(use_auth_token=)", "use_auth_token", "token", "removed in transformers 5.0")
        if not self.runtime.changes_numbers:
            return wrapped(*args, **kwargs)
        self._rewrite_for_mps(kwargs, change)
        folder = config_only_folder(args, kwargs) if self.runtime.plan_only else None
        model = self._without_weights(cls, folder, kwargs) if folder else wrapped(*args, **kwargs)
        self.runtime.place(model)
        return model

    def _without_weights(self, cls, folder: str, kwargs: dict):
        """`mps-shim plan` of a folder without weights: the model built from its config on the meta device."""
        import torch

        config = kwargs.get("config")
        if not hasattr(config, "to_dict"):  # not given, or given as a name: read it as from_pretrained would
            config = cls.config_class.from_pretrained(config or folder)
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        if dtype in (None, "auto"):  # None is fp32 in transformers 4.x, the checkpoint's dtype ("auto") in 5.x
            stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
            dtype = stored if dtype == "auto" or not self.accepts_use_auth_token else None
        dtype = getattr(torch, str(dtype).replace("torch.", "")) if dtype is not None else torch.float32
        model = build_from_config(cls, config, dtype, True, kwargs.get("attn_implementation"))
        self.runtime.report.change(
            "from_pretrained(weights)", folder, f"meta device ({str(dtype).replace('torch.', '')}, no memory)",
            "mps-shim plan of a folder with a config and no weight files: the model is built from its config without "
            "memory, sized from it, and never trained",
        )
        return model

    def _rewrite_for_mps(self, kwargs: dict, change) -> None:
        import torch

        runtime = self.runtime
        facts = runtime.facts
        dtype_key = "dtype" if "dtype" in kwargs else "torch_dtype"
        asked = kwargs.get(dtype_key)
        asked_name = None if asked is None else str(asked).replace("torch.", "")
        plan = runtime.precision.decide(model_dtype=asked_name)
        keep_checkpoint_dtype = asked_name in (None, "auto") and facts.capabilities.bf16_tensors
        if not keep_checkpoint_dtype and asked_name != plan.weights_dtype:
            kwargs[dtype_key] = getattr(torch, plan.weights_dtype)
            change(f"from_pretrained({dtype_key}=)", asked_name, plan.weights_dtype, plan.reason)

        placed = rewrite_device_map(kwargs.get("device_map"), facts.compute_device)
        if placed is not None:
            shown = "the Apple GPU (simulated: computed on the CPU)" if facts.simulated else "the Apple GPU"
            change("from_pretrained(device_map=)", kwargs["device_map"], placed, f"CUDA placement; {shown}")
            kwargs["device_map"] = placed

        if kwargs.get("attn_implementation") == "flash_attention_2":
            change("from_pretrained(attn_implementation=)", "flash_attention_2", "sdpa", "flash-attn has no macOS build")
            kwargs["attn_implementation"] = "sdpa"
        if kwargs.pop("use_flash_attention_2", False):
            change("from_pretrained(use_flash_attention_2=)", True, None, "flash-attn has no macOS build; sdpa")

        asked_quantization = {k: kwargs[k] for k in QUANTIZATION_KEYS if kwargs.get(k)}
        if asked_quantization and not bitsandbytes_runs_on_mps(facts):
            for key, value in asked_quantization.items():
                kwargs.pop(key)
                change(
                    f"from_pretrained({key}=)", type(value).__name__ if key == "quantization_config" else value,
                    None, "bitsandbytes does not run on this Mac (needs bitsandbytes>=0.50 and torch>=2.9): "
                    f"loading unquantized in {plan.weights_dtype} instead",
                )


PATCH = FromPretrainedPatch
