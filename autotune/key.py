"""The tuning key: everything a measured schedule depends on, so a stored result cannot go stale silently.

A config tuned for one kernel, compiler, GPU or library version is worthless (or wrong) for another, so the key
holds them all: the generated kernels' content hash (it changes with the spec and with every compiler change
that changes generated code), the attnc version, the GPU's name and compute capability, the Triton and torch
versions, the dtype, the head dims and a power-of-two bucket of each sequence length (tinygrad keys its cache
the same way). A changed field is a new key, hence a new study: nothing is reused across them.

The runtime builds the same text from the call's tensors (`_tune_key_text` in
attnc/runtime/tuning.py, which cannot import this module); tests check that the two agree.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .space import DType, KernelKind, Problem, bucket

__all__ = ["DeviceInfo", "TuningKey", "current_device", "kernel_hash"]

_CONTENT_LINE = "# content-sha256: "


@dataclass(frozen=True)
class DeviceInfo:
    """The device a measurement ran on, and the library versions that compiled the kernel."""

    name: str  # "NVIDIA H100 80GB HBM3", or "cpu" for interpreter runs
    cc: int  # compute capability as an integer (90), 0 for the CPU
    triton: str
    torch: str


def current_device(cuda: bool | None = None) -> DeviceInfo:
    """This process's device: the current CUDA GPU when there is one (or `cuda` asks for it), else the CPU."""
    import importlib.metadata

    import torch

    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = "none"
    use_cuda = torch.cuda.is_available() if cuda is None else cuda
    if use_cuda:
        major, minor = torch.cuda.get_device_capability()
        name = torch.cuda.get_device_name()
        return DeviceInfo(name, major * 10 + minor, triton_version, torch.__version__.split("+")[0])
    return DeviceInfo("cpu", 0, triton_version, torch.__version__.split("+")[0])


def kernel_hash(kernels_file: str | Path) -> str:
    """The content hash a generated `*_triton.py` file carries in its header (first 16 hex digits): the
    identity of the generated kernels, whatever file name or directory they were written to."""
    with open(kernels_file, encoding="utf-8") as f:
        for _ in range(4):
            line = f.readline()
            if line.startswith(_CONTENT_LINE):
                return line[len(_CONTENT_LINE) :].strip()[:16]
    raise ValueError(f"{kernels_file}: not an attnc-generated kernels file (no content-sha256 header)")


@dataclass(frozen=True)
class TuningKey:
    """One study: one kernel of one attention block, on one device and library stack, for one problem."""

    attention: str  # the attention block's name
    kernel: KernelKind
    kernel_hash: str  # `kernel_hash` of the generated kernels file
    attnc: str
    gpu: str
    cc: int
    triton: str
    torch: str
    dtype: DType
    head_dim: int
    v_dim: int
    q_bucket: int
    kv_bucket: int
    heavy: int = 0  # KernelWriter.heavy; not part of the text: it follows from the kernel hash

    @staticmethod
    def make(
        attention: str,
        kernel: KernelKind,
        kernels_hash: str,
        device: DeviceInfo,
        problem: Problem,
    ) -> TuningKey:
        from attnc.codegen.version import ATTNC_VERSION

        return TuningKey(
            attention=attention,
            kernel=kernel,
            kernel_hash=kernels_hash,
            attnc=ATTNC_VERSION,
            gpu=device.name,
            cc=device.cc,
            triton=device.triton,
            torch=device.torch,
            dtype=problem.dtype,
            head_dim=problem.head_dim,
            v_dim=problem.v_dim,
            q_bucket=bucket(problem.q_len),
            kv_bucket=bucket(problem.kv_len),
            heavy=problem.heavy,
        )

    def text(self) -> str:
        """The canonical text, `name=value` fields joined by `|`, in a fixed order. The runtime's
        `_tune_key_text` must produce exactly this; it is the key of the exported best-config table."""
        return "|".join(
            [
                f"attn={self.attention}",
                f"kernel={self.kernel.value}",
                f"kh={self.kernel_hash}",
                f"attnc={self.attnc}",
                f"gpu={self.gpu}",
                f"cc={self.cc}",
                f"triton={self.triton}",
                f"torch={self.torch}",
                f"dtype={self.dtype.value}",
                f"D={self.head_dim}",
                f"E={self.v_dim}",
                f"M={self.q_bucket}",
                f"N={self.kv_bucket}",
            ]
        )

    @staticmethod
    def from_text(text: str, heavy: int = 0) -> TuningKey:
        """The inverse of `text()` (what the runtime hands an autotune hook)."""
        f = dict(part.split("=", 1) for part in text.split("|"))
        try:
            return TuningKey(
                attention=f["attn"],
                kernel=KernelKind(f["kernel"]),
                kernel_hash=f["kh"],
                attnc=f["attnc"],
                gpu=f["gpu"],
                cc=int(f["cc"]),
                triton=f["triton"],
                torch=f["torch"],
                dtype=DType(f["dtype"]),
                head_dim=int(f["D"]),
                v_dim=int(f["E"]),
                q_bucket=int(f["M"]),
                kv_bucket=int(f["N"]),
                heavy=heavy,
            )
        except (KeyError, ValueError) as err:
            raise ValueError(f"not a tuning key: {text!r} ({err})") from None

    def study_name(self) -> str:
        """A short, storage-safe study name: readable prefix plus a digest of the full text."""
        digest = hashlib.sha256(self.text().encode()).hexdigest()[:16]
        return (
            f"attnc-{self.attention}-{self.kernel.value}-{self.dtype.value}-D{self.head_dim}-"
            f"M{self.q_bucket}-N{self.kv_bucket}-{digest}"
        )

    def problem(self) -> Problem:
        return Problem(self.head_dim, self.v_dim, self.dtype, self.q_bucket, self.kv_bucket, self.heavy)

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        d["kernel"] = self.kernel.value
        d["dtype"] = self.dtype.value
        return d

    @staticmethod
    def from_json(d: dict[str, object]) -> TuningKey:
        names = {f.name for f in fields(TuningKey)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["kernel"] = KernelKind(kw["kernel"])
        kw["dtype"] = DType(kw["dtype"])
        return TuningKey(**kw)  # type: ignore[arg-type]
