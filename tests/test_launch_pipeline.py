"""`evip run` of the tiny pipeline launched by two torchrun agents (launch/torchrun.sh,
--nnodes 2 --nproc-per-node 1, c10d rendezvous on 127.0.0.1): the two ranks train together."""
from __future__ import annotations

import pytest

from launch_pipeline_helpers import checkpoint_world_sizes, reference_losses

pytestmark = pytest.mark.slow


def test_two_agents_train_the_tiny_pipeline_together(tmp_path_factory):
    losses, _, _, log, run = reference_losses(tmp_path_factory)
    stages = ["s1_1_concept", "s1_2_semantic", "s1_3_alignment", "s2_instruct"]
    steps = {"s1_3_alignment": 8}
    assert [(s, i) for s, i, _ in losses] == [(s, i) for s in sorted(stages)
                                              for i in range(1, steps.get(s, 4) + 1)], log[-3000:]
    assert all(v == v and 0 < v < 20 for _, _, v in losses)          # finite, plausible
    assert checkpoint_world_sizes(run) == {2}                         # one rank per agent
    assert "[s2_instruct] step 4/4" in log
