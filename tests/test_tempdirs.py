"""Processes leave no temporary directory behind: the world-of-one process group's file store and
the CIDEr tokenizer's private copy are removed at exit (also when nobody calls destroy)."""

import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO

SCRIPTS = {
    "world of one, destroyed": "from flamingo_dist.distributed.groups import init_distributed, destroy_distributed\n"
                               "init_distributed(1); destroy_distributed()",
    "world of one, not destroyed": "from flamingo_dist.distributed.groups import init_distributed\n"
                                   "init_distributed(1)",
    "CIDEr": "from flamingo_dist.eval.metrics import cider\n"
             "print(cider({1: 'a red circle'}, {1: ['a red circle', 'a red ball']}))",
}


@pytest.mark.parametrize("case", list(SCRIPTS))
def test_no_temporary_directory_is_left_behind(case, tmp_path):
    if case == "CIDEr" and shutil.which("java") is None:
        pytest.skip("java (make system-deps) is needed for CIDEr's tokenizer")
    env = dict(os.environ, TMPDIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", SCRIPTS[case]], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # torch keeps its compile cache in $TMPDIR/torchinductor_<user> on purpose (it is reused)
    left = [name for name in os.listdir(tmp_path) if not name.startswith("torchinductor_")]
    assert left == [], left
