"""Every kernel path of the C engine this machine can execute (conftest.KERNEL_PATHS: portable,
AVX2 and AVX-512 with and without VNNI, or NEON), each built on its own: its kernels against a
float64 reference (tests/c/test_kernels.c) and its ./run through the C-side checks
(tests/c/test_run.sh). The cffi parity tests of test_engine.py and the attention test of
test_model.py run on every path too. The ARM paths are cross-compiled and run under qemu-aarch64
when the tools are installed (.ci/run installs them)."""

import os
import shutil
import subprocess

import pytest
from conftest import KERNEL_PATHS, ROOT


def test_this_machine_builds_and_tests_every_path_it_can_execute():
    names = [name for name, _ in KERNEL_PATHS]
    assert names[0] == "portable" and len(names) == len(set(names))
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if " avx2 " in flags:
        assert "avx2" in names
    if " avx512bw " in flags:
        assert "avx512" in names


def test_kernels_match_the_float64_reference(kernel_build):
    r = subprocess.run(
        [kernel_build.test_kernels], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"}
    )
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and lines[-1].endswith(" passed, 0 failed"), r.stdout[-2000:]
    assert lines[0] == f"kernels: {kernel_build.name}"  # the build runs the path it was asked for
    assert int(lines[-1].split()[0]) > 900


def test_run_passes_the_c_checks(kernel_build):
    r = subprocess.run(
        ["bash", "tests/c/test_run.sh"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "RUN": str(kernel_build.run)},
    )
    assert r.returncode == 0 and r.stdout.strip().endswith("passed, 0 failed"), r.stdout[-2000:]


ARM_TOOLS = ["aarch64-linux-gnu-gcc", "qemu-aarch64"]


@pytest.mark.skipif(
    not all(map(shutil.which, ARM_TOOLS)),
    reason="no aarch64 cross-compiler or qemu-aarch64 (Debian: gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user)",
)
def test_arm_neon_paths_pass_the_c_checks_under_qemu(tmp_path):
    r = subprocess.run(["make", "-s", "armtest", f"ARM_OUT={tmp_path}"], cwd=ROOT, capture_output=True, text=True)
    out = r.stdout
    assert r.returncode == 0, out[-3000:] + r.stderr[-2000:]
    # both builds: dot-product extension and plain NEON, each through the kernels and run's checks
    assert "kernels: neon-dotprod" in out and "kernels: neon\n" in out, out
    assert out.count(" passed, 0 failed") == 4 and " failed" not in out.replace(" 0 failed", ""), out
