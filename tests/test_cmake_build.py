"""The CMake build compiles the same sources into a module that loads and runs the ops."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT

LOAD_AND_RUN = """
import sys, torch
torch.ops.load_library(sys.argv[1])
hidden, weight = torch.randn(2, 3, 8), torch.randn(50, 8)
values, ids = torch.ops.diffrec_ext.seed_topk(hidden, weight, None, 5, None, None)
probs = torch.softmax(torch.einsum("bsd,vd->bsv", hidden, weight), -1).mean(1)
torch.testing.assert_close(values, torch.topk(probs, 5).values)
print("loaded", sys.argv[1])
"""


def run(command, env):
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cmake_build_configures_compiles_and_loads(tmp_path):
    env = dict(os.environ)
    if torch.version.cuda is not None:
        env.setdefault("CUDA_HOME", "/usr/local/cuda")
    configure = [
        "cmake", "-S", str(REPO_ROOT), "-B", str(tmp_path),
        f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
        f"-DPython3_EXECUTABLE={sys.executable}",
    ]
    run(configure, env)
    run(["cmake", "--build", str(tmp_path), "-j", str(os.cpu_count() or 1)], env)
    modules = list((tmp_path / "diffrec_ext").glob("_C*.so"))
    assert len(modules) == 1, modules
    assert "loaded" in run([sys.executable, "-c", LOAD_AND_RUN, str(modules[0])], env).stdout
