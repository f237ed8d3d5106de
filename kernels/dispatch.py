"""Choose, once per process, whether the public kernels run in Triton or in the torch reference.

Rule: ``SPECDEC_KERNELS=triton|torch`` forces a backend; otherwise Triton when triton is
importable and CUDA is available, else torch. Forcing ``triton`` without CUDA works only in
Triton's CPU interpreter (``TRITON_INTERPRET=1``, set by the tests; very slow) and otherwise
raises a ``ValueError`` that says so.

Under the ``triton`` backend, inputs that live on the CPU while the interpreter is off still go
to the torch reference (Triton cannot run them), so one process can verify CPU and GPU tensors.
"""

from __future__ import annotations

import functools
import os

import torch

from .common import interpreting
from .rng import HAS_TRITON

ENV_VAR = "SPECDEC_KERNELS"
BACKENDS = ("triton", "torch")


def choose_backend(env: str | None = None, cuda: bool | None = None) -> str:
    """The backend the rule above picks for this environment value and CUDA availability."""
    env = (os.environ.get(ENV_VAR, "") if env is None else env).strip().lower()
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if env not in ("", *BACKENDS):
        raise ValueError(f"{ENV_VAR}={env!r} is not a backend; use one of {', '.join(BACKENDS)}")
    if env == "torch":
        return "torch"
    if env == "triton":
        if not HAS_TRITON:
            raise ValueError(f"{ENV_VAR}=triton but triton is not installed; install it or unset {ENV_VAR}")
        if not cuda and not interpreting():
            raise ValueError(
                f"{ENV_VAR}=triton needs CUDA, or TRITON_INTERPRET=1 for the CPU interpreter "
                f"(slow, for tests); unset {ENV_VAR} to use the torch reference"
            )
        return "triton"
    return "triton" if (HAS_TRITON and cuda) else "torch"


@functools.lru_cache(maxsize=1)
def backend() -> str:
    """'triton' or 'torch': what dispatch chose for this process (decided on first call)."""
    return choose_backend()


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when this call should take the Triton path."""
    if backend() != "triton":
        return False
    return interpreting() or all(t.device.type == "cuda" for t in tensors)
