"""Resumable healing: the trained weights, optimizer, scheduler, step and RNG state.

A checkpoint is a folder ``step-NNNNNN`` inside ``<out>.partial-checkpoints/``; only the
trained weights are saved (the LoRA adapters, or with ``train="layers"`` the decoder layers),
never the frozen ones, so a LoRA checkpoint of a 7B model is a few tens of megabytes.
Each is written under a temporary name and renamed when complete, and
older ones are removed after a new one lands, so an interruption at any moment leaves a
usable checkpoint (or none).  Each process saves its own RNG state.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from layerfold.errors import LayerfoldError

PREFIX = "step-"


def checkpoint_dir_for(out: str | Path) -> Path:
    out = Path(out).expanduser().resolve()
    return out.with_name(f"{out.name}.partial-checkpoints")


def latest_checkpoint(folder: Path) -> Path | None:
    if not folder.is_dir():
        return None
    done = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
                  and p.name[len(PREFIX):].isdigit() and (p / "state.json").is_file())
    return done[-1] if done else None


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: Path, accelerator, step: int, adapters: dict[str, torch.Tensor], optimizer, scheduler,
                    state: dict) -> Path:
    """Every process calls this (it synchronises them); the main process writes the shared files."""
    from safetensors.torch import save_file

    final = folder / f"{PREFIX}{step:06d}"
    tmp = folder / f".{final.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        save_file({k: v.detach().cpu().contiguous() for k, v in adapters.items()}, str(tmp / "adapters.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=1) + "\n")
        tmp.rename(final)
        for old in folder.iterdir():
            if old != final and old.name.startswith(PREFIX):
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


@dataclass
class Resumed:
    step: int
    state: dict
    path: Path


def load_checkpoint(path: Path, accelerator, adapters: dict[str, torch.Tensor], optimizer, scheduler,
                    expected: dict) -> Resumed:
    """Restore a checkpoint written by :func:`save_checkpoint`, refusing one from another recipe."""
    from safetensors.torch import load_file

    state = json.loads((path / "state.json").read_text())
    differ = {k: (state["recipe"].get(k), v) for k, v in expected.items() if state["recipe"].get(k) != v}
    if differ:
        shown = "; ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, (a, b) in differ.items())
        raise LayerfoldError(f"cannot resume from {path}: the recipe changed ({shown}). Run with the same "
                             "options, or pass --overwrite to start again")
    saved = load_file(str(path / "adapters.safetensors"))
    if set(saved) != set(adapters):
        raise LayerfoldError(f"cannot resume from {path}: its trained weights do not match this model's")
    with torch.no_grad():
        for name, param in adapters.items():
            param.copy_(saved[name].to(param.dtype))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
    rng = path / f"rng-{accelerator.process_index}.pt"
    if not rng.is_file():
        raise LayerfoldError(f"cannot resume from {path}: no RNG state for process {accelerator.process_index}")
    _set_rng_state(torch.load(rng, weights_only=True))
    return Resumed(step=int(state["step"]), state=state, path=path)
