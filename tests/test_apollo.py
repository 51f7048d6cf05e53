"""components.optim.apollo_adamw: APOLLO against apollo-torch and the paper, its state, the recipe.

References: apollo-torch 1.0.3's own ``APOLLOAdamW`` driven as its README drives it (target weights
in one group with the APOLLO settings, the rest in a plain group), with each parameter's seed set
to what medtune derives from its name; and the paper's update rule in closed form for a first step.
Then the state (smaller than AdamW's, loadable with weights_only) and a real `tune run` of
configs/tiny/apollo.yaml: the loss falls and a run resumed from a step checkpoint logs the very
losses of the run that went on.
"""

import copy
import io
import math

import apollo_torch
import pytest
import torch
from torch import nn

from components.metric_logs import latest_log, step_losses
from components.optim import LayerwiseOptimizer, apollo_adamw
from components.optim.apollo import APOLLO_TARGETS, projection_seed
from tests.helpers import REPO_ROOT, header_command, run_cli
from tests.test_galore_optim import batches, make_model, train

RANK, GAP, STEPS = 4, 2, 5  # new projections at steps 0, 2, 4
ADAMW = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
SETTINGS = {
    "apollo": dict(rank=RANK, scale=16.0, scale_type="channel"),
    "apollo-mini": dict(rank=1, scale=128.0, scale_type="tensor"),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def reference_optimizer(model: nn.Module, settings) -> apollo_torch.APOLLOAdamW:
    """apollo-torch as its README uses it; the only change is each parameter's seed, by name."""
    names = {p: n for n, p in model.named_parameters()}
    targets = [p for n, p in model.named_parameters() if n.split(".")[-2] in APOLLO_TARGETS]
    regular = [p for n, p in model.named_parameters() if n.split(".")[-2] not in APOLLO_TARGETS]
    assert len(targets) == 7 * 4 and regular
    groups = [
        {"params": regular},
        {"params": targets, "update_proj_gap": GAP, "proj": "random", "proj_type": "std", **settings},
    ]
    optimizer = apollo_torch.APOLLOAdamW(groups, **ADAMW)
    for param in targets + regular:
        optimizer.state[param]["seed"] = projection_seed(names[param])
    return optimizer


@pytest.mark.parametrize("layerwise", [False, True], ids=["one-optimizer", "layerwise"])
@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_matches_apollo_torch_across_projection_updates(method, layerwise):
    reference, ours = make_model(), make_model()
    ref_opt = reference_optimizer(reference, SETTINGS[method])
    opt = apollo_adamw(
        list(ours.named_parameters()), update_proj_gap=GAP, layerwise=layerwise, **SETTINGS[method], **ADAMW
    )
    assert isinstance(opt, LayerwiseOptimizer) == layerwise
    w2 = dict(reference.named_parameters())["layers.1.mlp.w2.weight"]
    projections = []
    for step, tokens in enumerate(batches(STEPS)):
        train(reference, ref_opt, [tokens], steps_in_backward=False)
        train(ours, opt, [tokens], steps_in_backward=layerwise)
        projections.append(ref_opt.state[w2]["projector"].ortho_matrix.clone())
        for (name, expected), (_, actual) in zip(reference.named_parameters(), ours.named_parameters()):
            torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0, msg=f"step {step + 1}: {name}")
    # new random projections at steps 0, 2 and 4 (none in between), and the weights moved
    assert torch.equal(projections[0], projections[1]) and not torch.equal(projections[1], projections[2])
    assert not torch.equal(projections[3], projections[4])
    assert not torch.equal(w2, make_model().layers[1].mlp.w2.weight)


class OneWeight(nn.Module):
    def __init__(self, m: int, n: int):
        super().__init__()
        self.q_proj = nn.Linear(n, m, bias=False)


@pytest.mark.parametrize("shape", [(24, 16), (16, 24)], ids=["rows", "columns"])
@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_first_step_is_the_papers_update_in_closed_form(method, shape):
    """Step 1 of APOLLO (paper, Algorithm 1), with eps = 0 and no weight decay: the auxiliary
    AdamW's normalised update is sign(R) * (1 - b1) / sqrt(1 - b2) for R the projected gradient,
    so after bias correction each channel c of the gradient G moves by
    lr * sqrt(scale) * sqrt(rank) * G_c / |R_c| (channel-wise), and the whole weight by
    lr * sqrt(scale) * sqrt(R.numel()) * G / |R|_F (tensor-wise). The projection is Gaussian
    with variance 1 / rank, drawn from the parameter's name."""
    torch.manual_seed(0)
    model = OneWeight(*shape)
    settings = SETTINGS[method]
    lr, rank, scale = 1e-2, settings["rank"], settings["scale"]
    opt = apollo_adamw(list(model.named_parameters()), lr=lr, eps=0.0, target_modules=["q_proj"], **settings)
    before = model.q_proj.weight.detach().clone()
    grad = torch.randn(shape)
    model.q_proj.weight.grad = grad.clone()
    opt.step()

    m, n = shape
    right = m >= n  # std: project the longer side away
    seeded = torch.Generator().manual_seed(projection_seed("q_proj.weight"))
    projection = torch.randn((rank, n) if right else (m, rank), generator=seeded) / math.sqrt(rank)
    torch.testing.assert_close(opt.state[model.q_proj.weight]["projector"].ortho_matrix, projection)
    projected = grad @ projection.T if right else projection.T @ grad
    if settings["scale_type"] == "channel":
        norms = projected.norm(dim=1, keepdim=True) if right else projected.norm(dim=0, keepdim=True)
        factor = math.sqrt(rank) / norms
    else:
        factor = math.sqrt(projected.numel()) / projected.norm()
    expected = before - lr * math.sqrt(scale) * factor * grad
    torch.testing.assert_close(model.q_proj.weight.detach(), expected, atol=1e-6, rtol=1e-5)


def state_elements(state) -> int:
    """Elements of the tensors an APOLLO parameter keeps between steps (moments, projection)."""
    return sum(
        t.numel() for t in (state.get("exp_avg"), state.get("exp_avg_sq"), state["projector"].ortho_matrix)
    ) + 1  # the norm-growth limiter's last norm


@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_state_of_projected_weights_is_a_fraction_of_adamws(method):
    model = make_model()
    opt = apollo_adamw(list(model.named_parameters()), **SETTINGS[method], **ADAMW)
    train(model, opt, batches(1), steps_in_backward=False)
    rank = SETTINGS[method]["rank"]
    ours = adamw = 0
    for name, param in model.named_parameters():
        if name.split(".")[-2] not in APOLLO_TARGETS:
            continue
        m, n = param.shape
        state = opt.state[param]
        # std: moments of the projected gradient (max(m, n) x rank), projection rank x min(m, n)
        assert state_elements(state) == 2 * max(m, n) * rank + rank * min(m, n) + 1, name
        ours += state_elements(state)
        adamw += 2 * m * n
    # the tiny model's weights are 128 to 768 wide: rank 4 keeps ~2.3% of AdamW's elements, rank 1 ~0.6%
    assert ours / adamw < {"apollo": 0.03, "apollo-mini": 0.007}[method], (ours, adamw)


def roundtrip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("layerwise", [False, True], ids=["one-optimizer", "layerwise"])
def test_state_loads_with_weights_only_and_training_continues_identically(layerwise):
    data = batches(6)
    build = lambda model: apollo_adamw(  # noqa: E731
        list(model.named_parameters()), update_proj_gap=GAP, layerwise=layerwise, **SETTINGS["apollo"], **ADAMW
    )
    model = make_model()
    opt = build(model)
    train(model, opt, data[:3], steps_in_backward=layerwise)
    saved = roundtrip(opt.state_dict())
    resumed_model = copy.deepcopy(model)
    resumed = build(resumed_model)
    resumed.load_state_dict(saved)
    train(model, opt, data[3:], steps_in_backward=layerwise)  # crosses the update at step 4
    train(resumed_model, resumed, data[3:], steps_in_backward=layerwise)
    for (name, expected), (_, actual) in zip(model.named_parameters(), resumed_model.named_parameters()):
        assert torch.equal(actual, expected), name
    one = saved["layers.0.attn.q_proj.weight"] if layerwise else saved
    projector = one["state"][0 if layerwise else min(one["param_groups"][1]["params"])]["projector"]
    assert projector["proj"] == "random" and isinstance(projector["ortho_matrix"], torch.Tensor)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rank=0), "APOLLO rank must be an integer >= 1"),
        (dict(update_proj_gap=1.5), "APOLLO update_proj_gap must be an integer >= 1"),
        (dict(scale=0), "APOLLO scale must be > 0"),
        (dict(scale_type="row"), "APOLLO scale_type must be one of"),
        (dict(proj="gaussian"), "APOLLO proj must be one of"),
        (dict(proj_type="full"), "APOLLO proj_type must be one of"),
        (dict(target_modules=["o_proj"]), r"APOLLO target_modules \['o_proj'\] match no 2-D weight.*output_proj"),
    ],
)
def test_bad_settings_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        apollo_adamw(list(make_model().named_parameters()), **kwargs)


# ---- the recipe ------------------------------------------------------------------------------

# New projections at optimizer steps 1, 4 and 7: the resumed run (from step 4) crosses one.
RECIPE_STEPS, SAVE_EVERY, RECIPE_GAP = 8, 4, 3
# First losses for seed 42 on this project's CPU build of torch (one OpenMP thread): the untrained
# model's (as every tiny config's), then APOLLO's first two updates.
PINNED_FIRST_LOSSES = [7.778120, 7.551310, 7.124706]


def tiny_command(output_dir, *extra):
    command = header_command(REPO_ROOT / "configs" / "tiny" / "apollo.yaml")
    assert command[:3] == ["tune", "run", "recipes/galore_finetune_single_device.py"]
    return command[1:] + [
        f"output_dir={output_dir}", f"max_steps_per_epoch={RECIPE_STEPS}", f"save_every_n_steps={SAVE_EVERY}",
        f"optimizer.update_proj_gap={RECIPE_GAP}", *extra,
    ]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("apollo")
    run_cli("tune", tiny_command(output_dir))
    return output_dir


def test_tiny_config_loss_falls_and_checkpoints_hold_apollo_state(tiny_run):
    losses = step_losses(latest_log(tiny_run))
    assert sorted(losses) == list(range(1, RECIPE_STEPS + 1))
    values = [losses[s] for s in sorted(losses)]
    assert sum(values[-2:]) / 2 < sum(values[:2]) / 2 - 0.5, values
    assert values[:3] == pytest.approx(PINNED_FIRST_LOSSES, abs=1e-4), values[:3]
    optimizer = torch.load(tiny_run / "step_4" / "recipe_state.pt", weights_only=True)["optimizer"]
    plain, projected = optimizer["param_groups"]
    assert "rank" not in plain
    assert (projected["rank"], projected["scale_type"], projected["proj"]) == (16, "channel", "random")
    projectors = [optimizer["state"][i]["projector"] for i in projected["params"]]
    assert len(projectors) == 4 * 7 and len({p["seed"] for p in projectors}) == 4 * 7


def test_tiny_config_resumes_exactly_from_a_step_checkpoint(tiny_run, tmp_path):
    expected = step_losses(latest_log(tiny_run))
    output_dir = tmp_path / "resumed"
    run_cli("tune", tiny_command(output_dir, "resume_from_checkpoint=True", f"resume_from={tiny_run / 'step_4'}"))
    resumed = step_losses(latest_log(output_dir))
    assert sorted(resumed) == list(range(SAVE_EVERY + 1, RECIPE_STEPS + 1))
    for step, loss in resumed.items():
        assert loss == pytest.approx(expected[step], abs=1e-6), (step, resumed, expected)
