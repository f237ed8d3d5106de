"""A fine-tune's resumable state: what `<out>.ckpt/state.pt` holds and how a run resumes.

`specdec.finetune` saves a `TrainState` (trainable weights, optimizer, scheduler, step, loss
curve and every process's RNG state) every --save-every steps; a rerun with the same
fingerprint (recipe, data and draft by content) loads it and continues bit-identically.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console


def ckpt_dir(out: str | Path) -> Path:
    return Path(f"{out}.ckpt")


def world() -> tuple[int, int]:
    """(rank, world_size) of the initialised process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(path: Path, state: dict[str, Any]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / f".state.pt.tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path / "state.pt")


@dataclass
class TrainState:
    """What a step changes and a checkpoint holds."""

    trainable: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    step: int = 0
    curve: list[dict[str, Any]] = field(default_factory=list)


def resume(state: TrainState, ckpt: Path, fp: str, console: Console) -> bool:
    """Load `<out>.ckpt/state.pt` into `state` if there is one (made by the same recipe)."""
    rank, world_size = world()
    if not (ckpt / "state.pt").is_file():
        return False
    saved = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
    if saved["fingerprint"] != fp:
        raise ValueError(f"{ckpt} was made with another recipe or data; rerun with the same "
                         f"arguments to resume, or delete it to start over")
    with torch.no_grad():
        for name, p in state.trainable.items():
            p.copy_(saved["trainable"][name])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    state.step, state.curve = saved["step"], saved["curve"]
    if len(saved["rng"]) == world_size:
        set_rng_state(saved["rng"][rank])
    elif rank == 0:
        console.print("[yellow]note:[/yellow] resuming with another number of processes; "
                      "dropout masks will differ from an uninterrupted run")
    return True


def checkpoint(state: TrainState, ckpt: Path, fp: str) -> None:
    """Write `state` to `<out>.ckpt/state.pt` (rank 0; every rank's RNG state)."""
    rank, world_size = world()
    rngs = [None] * world_size
    if world_size > 1:
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    if rank == 0:
        save_training_state(ckpt, {
            "fingerprint": fp, "step": state.step, "curve": state.curve, "rng": rngs,
            "trainable": {n: p.detach().cpu() for n, p in state.trainable.items()},
            "optimizer": state.optimizer.state_dict(),
            "scheduler": state.scheduler.state_dict()})


def plot_curve(curve: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [c["step"] for c in curve]
    ax.plot(steps, [c["loss"] for c in curve], label="loss")
    if any(c.get("kd") is not None for c in curve):
        ax.plot(steps, [c["ce"] for c in curve], label="cross-entropy", alpha=0.7)
        ax.plot(steps, [c["kd"] for c in curve], label="KL(target || draft)", alpha=0.7)
        ax.plot(steps, [c["tv"] for c in curve], label="TV(target, draft)", alpha=0.7)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("loss per response token")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
