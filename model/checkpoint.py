"""Reading safetensors checkpoints into modules built on the meta device.

Every model in `model/` is loaded the same way:

1. read tensor names and shapes from the file header (no tensor data yet),
2. derive the architecture from those names and shapes (each model's `config_from_state_dict`),
3. build the module on the meta device (no memory, no random init),
4. stream the tensors one at a time to the target device and dtype and *assign* them to the
   module with `load_state_dict(strict=True, assign=True)`.

So host memory stays near one tensor, and no parameter ever exists twice. A file that does
not match the module fails with one sentence naming what is missing or unexpected.

Read next: model/clip.py.
"""

import os

import torch
from safetensors import SafetensorError, safe_open


class UserError(Exception):
    """A mistake the user can fix; scripts print its message (one sentence) and exit."""


class CheckpointError(UserError):
    """A checkpoint file that is missing, unreadable or not what it should be."""


def _open(path):
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return safe_open(path, framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupt, download it again"
        ) from None


def read_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, read from the safetensors header only."""
    with _open(path) as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


def read_metadata(path: str) -> dict[str, str]:
    with _open(path) as f:
        return f.metadata() or {}


def stream_tensors(path, names, device="cpu", dtype=None, strip_prefix=""):
    """Yield (name without `strip_prefix`, tensor) for each name, one tensor in memory at a time.

    Floating tensors are cast to `dtype` (when given); integer tensors keep theirs."""
    with _open(path) as f:
        for name in names:
            try:
                t = f.get_tensor(name)
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"tensor {name} in {path} cannot be read ({e}); the file may be corrupt") from None
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            yield name[len(strip_prefix):], t.to(device)


def _examples(keys, n=3):
    keys = sorted(keys)
    shown = ", ".join(keys[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")


def load_strict(module: torch.nn.Module, state_dict: dict, what: str, ignore=()) -> torch.nn.Module:
    """Assign `state_dict` to a meta-device `module`, requiring an exact match of names and shapes.

    `ignore` lists keys that checkpoints may legitimately carry and the module does not use
    (each caller documents why)."""
    state_dict = {k: v for k, v in state_dict.items() if k not in ignore}
    expected = module.state_dict()
    missing = expected.keys() - state_dict.keys()
    unexpected = state_dict.keys() - expected.keys()
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_examples(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_examples(unexpected)})")
        raise CheckpointError(f"the {what} weights do not match the {what} architecture: " + "; ".join(parts) + " tensors")
    wrong = [k for k, v in state_dict.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        k = wrong[0]
        raise CheckpointError(
            f"the {what} weights have {len(wrong)} tensors of the wrong shape, e.g. {k} is "
            f"{tuple(state_dict[k].shape)} but the architecture needs {tuple(expected[k].shape)}"
        )
    module.load_state_dict(state_dict, strict=True, assign=True)
    return module.eval().requires_grad_(False)
