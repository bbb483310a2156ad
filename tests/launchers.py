"""How the tests start two processes: torchrun and accelerate launch, 2 gloo processes on CPUs.

Both take the default rendezvous port, so every test that starts one carries `ONE_AT_A_TIME`: pytest-xdist
(`make test`, `--dist loadgroup`) runs the whole group on one worker, never two launchers at once."""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
# the DDP config file runs on CPUs too (gloo); accelerate's MULTI_CPU type would start one process only
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(REPO / "configs" / "accelerate" / "ddp.yaml"), "--num_processes", "2"]
LAUNCHERS = {"torchrun": TORCHRUN, "accelerate": ACCELERATE}
ONE_AT_A_TIME = pytest.mark.xdist_group("launchers")
