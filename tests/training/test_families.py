"""Every family other than Qwen3 through the whole pipeline on CPU: a tiny Llama-3.1-style model (llama3 RoPE
scaling on) is converted, its pairs packed, reference log-probs scored and SPoT trained at TP1 (DP2) and TP2;
per-step losses of spot-bco (TRL's bco_pair) and dpo (TRL's sigmoid) equal the plain PyTorch + transformers
implementation of the same recipe (tests/training/recipe.py) for 10 steps.
"""
import os

import numpy as np
import pytest

from tests.multiprocess import run_on_ranks
from tests.training.recipe import overrides, reference_losses

STEPS = 10
FAMILY_PRESETS = ["llama3-tiny"]  # tied Llama and every layout: tests/platform/test_layouts.py
LAYOUTS = [(1, 1), (2, 1)]  # (tp, pp) on 2 ranks: TP1 x DP2 and TP2 x DP1


def _worker(rank, world_size, ws):
    from megatron_spot.config import TrainConfig, load_config
    from megatron_spot.train import run
    from megatron_spot.training.reference import score_reference

    out = {}
    score_reference(load_config(TrainConfig, None, overrides(ws, os.path.join(ws["root"], "score"), tp=1, pp=1,
                                                             steps=STEPS)), progress=False)
    for tp, pp in LAYOUTS:
        for objective in ("spot-bco", "dpo"):
            run_dir = os.path.join(ws["root"], f"run_{objective}_tp{tp}pp{pp}")
            summary = run(load_config(TrainConfig, None, overrides(ws, run_dir, objective, tp, pp, steps=STEPS)))
            out[(tp, pp, objective)] = {"losses": [h["loss"] for h in summary["history"]],
                                        "margin": summary["history"][-1]["rewards/margin"]}
    return out


@pytest.fixture(scope="module", params=FAMILY_PRESETS)
def family_run(request, tmp_path_factory):
    from tests.tiny import build_train_workspace

    ws = build_train_workspace(str(tmp_path_factory.mktemp(request.param)), num_pairs=8 * STEPS, preset=request.param)
    return ws, run_on_ranks(_worker, world_size=2, args=(ws,))[0]


_REFERENCE: dict = {}


def _reference(ws, objective, dp):
    """One plain-PyTorch run per (workspace, objective, data-parallel split)."""
    key = (ws["root"], objective, dp)
    if key not in _REFERENCE:
        _REFERENCE[key] = reference_losses(ws, objective, steps=STEPS, dp=dp)
    return _REFERENCE[key]


@pytest.mark.slow
@pytest.mark.parametrize("tp, pp", LAYOUTS, ids=[f"tp{t}pp{p}" for t, p in LAYOUTS])
@pytest.mark.parametrize("objective", ["spot-bco", "dpo"])
def test_family_trains_like_the_plain_pytorch_reference(family_run, tp, pp, objective):
    ws, results = family_run
    got = results[(tp, pp, objective)]
    assert len(got["losses"]) == STEPS
    assert abs(got["margin"]) > 1e-2 and abs(got["losses"][-1] - got["losses"][0]) > 1e-2  # training moved
    ref = _reference(ws, objective, dp=2 // (tp * pp))  # 2 ranks
    np.testing.assert_allclose(got["losses"][1:], ref[1:], rtol=1e-5)
