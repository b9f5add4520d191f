"""A stand-in for the GPU machine's Python: a venv whose site-packages holds only the image's packages.

    python benchmarks/gpu/standin.py DEST [--image benchmarks/gpu/image-packages.txt]

Links every distribution of this interpreter's environment that image-packages.txt names (dist-info and the files
its RECORD lists) into DEST's site-packages, and nothing else: MLflow, Optuna, SQLAlchemy, pydantic... are missing
there as on the GPU machine, so a wheelhouse installed with --no-deps has to bring all they need.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_names(path: Path) -> set[str]:
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return {normalize(line) for line in lines if line}


def top_level_entries(dist: metadata.Distribution) -> set[str]:
    """The first path component of every installed file (packages, modules, .pth), the dist-info folder included."""
    entries = set()
    for f in dist.files or []:
        parts = Path(f).parts
        if parts and parts[0] not in ("..", "__pycache__") and not parts[0].endswith(".data"):
            entries.add(parts[0])
    return entries


def build(dest: Path, image: Path) -> list[str]:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(dest)], check=True)
    site = Path(subprocess.run([str(dest / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    ours = Path(sysconfig.get_paths()["purelib"])
    wanted = image_names(image)
    linked = []
    for dist in metadata.distributions(path=[str(ours)]):
        if normalize(dist.metadata["Name"]) not in wanted:
            continue
        for entry in top_level_entries(dist):
            link = site / entry
            if (ours / entry).exists() and not link.exists():
                link.symlink_to(ours / entry)
        linked.append(f"{dist.metadata['Name']}=={dist.version}")
    return sorted(linked)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dest", type=Path)
    parser.add_argument("--image", type=Path, default=HERE / "image-packages.txt")
    args = parser.parse_args()
    linked = build(args.dest, args.image)
    print(f"{args.dest}: {len(linked)} of the image's packages linked from {sysconfig.get_paths()['purelib']}")


if __name__ == "__main__":
    main()
