"""Building the network and filling it with weights.

`[matanyone] weights` (or a job's `model`) names where the weights come from:

    "tiny"                      the small random network (TINY sizes, fixed seed): tests, demos
    /path/matanyone.pth         the v1 release, read with torch.load(weights_only=True), so a
                                file that needs arbitrary unpickling is refused, not run
    /path/x.safetensors         a re-pack (v1 or v2; same architecture), with an optional
                                config.json beside it holding `model` sizes
    "owner/repo[:file]"         a Hugging Face hub id: the file is fetched only from the local
                                cache (no download happens at run time); default file
                                matanyone.pth, else matanyone.safetensors

Keys are checked before loading: missing, unexpected or mis-shaped tensors raise
`WeightsError` naming a few of each. Training-only entries (`aux_computer.*`) may be
absent. A multi-object checkpoint (mask channel + "others" channel) is narrowed to the
single-object network by dropping the extra input channel.
"""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import torch

from .config import OFFICIAL, TINY, MatAnyOneNetConfig
from .network import MatAnyOneNet

__all__ = ["WeightsError", "build_network", "load_state", "resolve_weights_file", "save_state"]

OPTIONAL_PREFIXES = ("aux_computer.",)
_NARROWED = ("mask_encoder.conv1.weight", "pixel_fuser.sensory_compress.weight")
HUB_FILES = ("matanyone.pth", "matanyone.safetensors", "model.safetensors")


class WeightsError(Exception):
    """The weights could not be found, read or matched to the network."""


def resolve_weights_file(name: str) -> Path:
    """A local path, or a file from the local hub cache for `owner/repo[:file]`."""
    path = Path(name).expanduser()
    if path.suffix in (".pth", ".pt", ".safetensors") or path.is_absolute() or path.exists():
        if not path.is_file():
            raise WeightsError(f"weights file not found: {path}")
        return path.resolve()
    repo, _, filename = name.partition(":")
    if repo.count("/") != 1:
        raise WeightsError(
            f"weights {name!r} is neither 'tiny', a .pth/.safetensors file nor a hub id"
        )
    from huggingface_hub import hf_hub_download

    for candidate in (filename,) if filename else HUB_FILES:
        try:
            return Path(hf_hub_download(repo, candidate, local_files_only=True))
        except Exception:
            continue
    raise WeightsError(
        f"weights {name!r} are not in the local Hugging Face cache; download them first "
        f"(e.g. `huggingface-cli download {repo}`)"
    )


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """Read tensors only. A .pth that would need arbitrary code to unpickle is refused."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"cannot read weights {path}: {type(exc).__name__}: {exc}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if isinstance(state, dict) and isinstance(state.get("network"), dict):
        state = state["network"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights {path} do not hold a flat dictionary of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def save_state(net: MatAnyOneNet, path: Path) -> Path:
    """Write the network's weights as .safetensors or .pth (by suffix)."""
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, str(path))
    return path


def config_for(path: Path) -> MatAnyOneNetConfig:
    """OFFICIAL sizes unless a config.json beside the weights says otherwise."""
    sidecar = path.with_name("config.json")
    if not sidecar.is_file():
        return OFFICIAL
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
        model = data.get("model", data) if isinstance(data, dict) else {}
        return msgspec.convert(model, MatAnyOneNetConfig)
    except (ValueError, msgspec.ValidationError) as exc:
        raise WeightsError(f"cannot use {sidecar}: {exc}") from None


def check_and_adapt(net: MatAnyOneNet, state: dict[str, torch.Tensor], source: str) -> dict:
    """Match `state` to `net` key by key; raise naming what differs."""
    own = net.state_dict()
    state = dict(state)
    for key in _NARROWED:
        if key in state and key in own and state[key].shape[1] == own[key].shape[1] + 1:
            state[key] = state[key][:, : own[key].shape[1]]
    missing = sorted(k for k in own if k not in state and not k.startswith(OPTIONAL_PREFIXES))
    unexpected = sorted(k for k in state if k not in own)
    shapes = sorted(
        f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    )
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            problems.append(f"{len(items)} {label}: {', '.join(items[:3])}{more}")
    if problems:
        raise WeightsError(f"weights {source} do not fit the network: " + "; ".join(problems))
    for k in own:
        if k not in state:
            state[k] = own[k]
    return state


def build_network(
    weights: str, device: str | torch.device = "cpu", seed: int = 0
) -> tuple[MatAnyOneNet, str]:
    """The eval-mode network for `weights` and a description of where it came from."""
    if weights == "tiny":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = MatAnyOneNet(TINY)
            _randomise_norms(net)
        return net.to(device).eval(), f"tiny (seed {seed})"
    path = resolve_weights_file(weights)
    state = load_state(path)
    net = MatAnyOneNet(config_for(path))
    net.load_state_dict(check_and_adapt(net, state, str(path)), strict=True)
    return net.to(device).eval(), str(path)


def _randomise_norms(net: MatAnyOneNet) -> None:
    """Fresh BatchNorms are identity maps with unit variance statistics; give them
    varied statistics so the random network's outputs vary with its inputs."""
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
