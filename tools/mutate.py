"""Mutation check: how many of the planted bugs in tools/mutants.py the tests catch.

Each mutant is applied alone to a scratch copy of the repository (the working tree's
files, or ``--rev``'s), the tests it names run there on CPU (the Triton
kernels under the interpreter), and it is killed when they fail. First the unmutated copy
must pass those tests, or every mutant would look killed. Prints one line per mutant and
the score; exits 1 when a mutant survives or a run breaks.

    .venv/bin/python tools/mutate.py                    # all of them
    .venv/bin/python tools/mutate.py --only wgrad-splits-all-write-slot-0
    .venv/bin/python tools/mutate.py --rev 3dd48cf      # an older commit's code and tests

Mutants of the extension's CPU part (registration.cpp and scale_shift_add_relu.*, what the
CPU tests of the extension load) rebuild that part alone in the scratch copy, without the
CUDA code's ops (FUSED_RESNET_CPU_ONLY); other csrc/ files are compiled by the tests that
check them (tests/cuda_host/).
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mutants import MUTANTS, Mutant

ROOT = Path(__file__).resolve().parent.parent
CPU_EXTENSION_SOURCES = ["csrc/registration.cpp", "csrc/scale_shift_add_relu.cpp"]
CPU_EXTENSION_FILES = CPU_EXTENSION_SOURCES + ["csrc/scale_shift_add_relu.h"]


def _working_tree_files() -> list[str]:
    """Tracked files and untracked ones git does not ignore (work not yet committed)."""
    return subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                          check=True, capture_output=True, text=True).stdout.split()


def make_scratch_copy(rev: str | None, directory: Path) -> Path:
    """The repository's files under ``directory``/repo, importable from there.

    The editable install maps ``fused_resnet.kernels`` to this checkout's kernels/, so the
    copy links fused_resnet/kernels to its own kernels/ (found first on the path); the
    built extension is copied from this checkout."""
    repo = directory / "repo"
    repo.mkdir()
    if rev is None:
        for name in _working_tree_files():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    else:
        archive = subprocess.run(["git", "archive", rev], cwd=ROOT, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(repo)], input=archive, check=True)
    (repo / "fused_resnet" / "kernels").symlink_to("../kernels")
    restore_extension(repo)
    return repo


def _environment(repo: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "PYTEST_ADDOPTS"}
    env.update(TRITON_INTERPRET="1", PYTHONPATH=str(repo), PYTHONDONTWRITEBYTECODE="1")
    return env


def _check_imports_from(repo: Path) -> None:
    where = subprocess.run(
        [sys.executable, "-c", "import fused_resnet, fused_resnet.kernels as k; "
         "print(fused_resnet.__file__); print(k.__file__)"],
        cwd=repo, env=_environment(repo), check=True, capture_output=True, text=True).stdout
    for path in where.split():
        if not Path(path).resolve().is_relative_to(repo.resolve()):
            sys.exit(f"mutate: the scratch copy imports {path}, not its own files")


def run_tests(repo: Path, tests: tuple[str, ...]) -> tuple[int, str]:
    # An older revision (--rev) may not have every test file yet.
    present = [t for t in tests if not t.endswith(".py") or (repo / t).exists()]
    result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p",
                             "no:cacheprovider", *present], cwd=repo, env=_environment(repo),
                            capture_output=True, text=True)
    return result.returncode, result.stdout + result.stderr


def rebuild_cpu_extension(repo: Path, build: Path) -> None:
    """fused_resnet._C from the CPU sources only, in place of the copied one."""
    build.mkdir(exist_ok=True)
    code = ("from torch.utils.cpp_extension import load; "
            f"load(name='_C', sources={[str(repo / s) for s in CPU_EXTENSION_SOURCES]}, "
            f"extra_include_paths=['{repo / 'csrc'}'], build_directory='{build}', "
            "extra_cflags=['-DFUSED_RESNET_CPU_ONLY'], is_python_module=False)")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    for old in (repo / "fused_resnet").glob("_C*.so"):
        shutil.copy2(build / "_C.so", old)


def restore_extension(repo: Path) -> None:
    """The extension as this checkout built it, in place of a rebuilt mutant's."""
    for built in (ROOT / "fused_resnet").glob("_C*.so"):
        shutil.copy2(built, repo / "fused_resnet" / built.name)


def apply(repo: Path, mutant: Mutant) -> str:
    """Plant the mutant; returns the file's original text."""
    path = repo / mutant.path
    original = path.read_text()
    count = original.count(mutant.old)
    if count != 1:
        raise ValueError(f"{mutant.name}: the text to replace occurs {count} times in "
                         f"{mutant.path}, expected once")
    path.write_text(original.replace(mutant.old, mutant.new))
    return original


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants only")
    parser.add_argument("--rev", help="mutate this commit's files instead of the working tree")
    args = parser.parse_args()
    selected = [m for m in MUTANTS if args.only is None or m.name in args.only]
    if not selected:
        sys.exit(f"mutate: no mutant named {args.only}; see tools/mutants.py")
    with tempfile.TemporaryDirectory(prefix="fused_resnet_mutants_") as scratch:
        repo = make_scratch_copy(args.rev, Path(scratch))
        _check_imports_from(repo)
        for tests in dict.fromkeys(m.tests for m in selected):
            status, output = run_tests(repo, tests)
            if status != 0:
                print(output[-3000:])
                sys.exit(f"mutate: the unmutated copy fails {' '.join(tests)} "
                         f"(pytest exit {status})")
        results = []
        for mutant in selected:
            start = time.monotonic()
            try:
                original = apply(repo, mutant)
            except ValueError as error:
                results.append((mutant, "not applicable", str(error)))
                print(f"{'n/a':>9}  {mutant.name}: {error}", flush=True)
                continue
            try:
                if mutant.path in CPU_EXTENSION_FILES:
                    rebuild_cpu_extension(repo, Path(scratch) / "extension")
                status, output = run_tests(repo, mutant.tests)
            finally:
                (repo / mutant.path).write_text(original)
                restore_extension(repo)
            verdict = {0: "SURVIVED", 1: "killed"}.get(status, f"broken (pytest exit {status})")
            results.append((mutant, verdict, output))
            print(f"{verdict:>9}  {mutant.name}  ({mutant.path}, "
                  f"{time.monotonic() - start:.0f} s)", flush=True)
            if status not in (0, 1):
                print(output[-2000:])
    applicable = [r for r in results if r[1] != "not applicable"]
    killed = sum(verdict == "killed" for _, verdict, _ in applicable)
    print(f"\n{killed} of {len(applicable)} mutants killed"
          + (f" ({len(results) - len(applicable)} not applicable to this revision)"
             if len(applicable) < len(results) else ""))
    survivors = [m.name for m, verdict, _ in applicable if verdict != "killed"]
    if survivors:
        print("not killed: " + ", ".join(survivors))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
