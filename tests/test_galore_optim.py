"""components.optim: GaLore builders against galore-torch itself, layer-wise stepping, state files.

The reference is galore-torch 1.0's own optimizer driven the way its README drives it: the
target weights in one group with rank/update_proj_gap/scale/proj_type, every other parameter in
a plain group of the same optimizer. Our builders (both modes) must move the same model through
the same batches to the same parameters within 1e-6 in fp32, across projection updates.
"""

import io
import pickle

import galore_torch
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from components.models import tiny_llama3_2
from components.optim import (
    GALORE_TARGETS,
    LayerwiseOptimizer,
    galore_adafactor,
    galore_adamw,
    galore_adamw8bit,
    split_galore_params,
)

RANK, GAP = 8, 2  # projections recomputed at steps 0, 2, 4: several updates in a short run
STEPS = 5
ATOL = 1e-6


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread: on a small shared CPU machine a 2-thread LAPACK SVD (GaLore's projection
    update) can take 100x longer than a 1-thread one."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return tiny_llama3_2()  # fp32


def batches(n: int):
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 2000, (2, 12), generator=generator) for _ in range(n)]


def loss_of(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1))


def reference_optimizer(model: nn.Module, **kwargs):
    """galore-torch as its README uses it, with the target weights found by module type and name."""
    targets = {
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.split(".")[-1] in GALORE_TARGETS
    }
    galore = [p for n, p in model.named_parameters() if n in targets]
    regular = [p for n, p in model.named_parameters() if n not in targets]
    assert len(galore) == 7 * 4 and regular
    groups = [
        {"params": regular},
        {"params": galore, "rank": RANK, "update_proj_gap": GAP, "scale": 0.25, "proj_type": "std"},
    ]
    return galore_torch.GaLoreAdamW(groups, no_deprecation_warning=True, **kwargs)


def train(model, optimizer, tokens_list, steps_in_backward: bool):
    for tokens in tokens_list:
        loss_of(model, tokens).backward()
        if not steps_in_backward:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


ADAMW = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


@pytest.mark.parametrize("layerwise", [False, True], ids=["one-optimizer", "layerwise"])
def test_matches_galore_torch_adamw_across_projection_updates(layerwise):
    reference, ours = make_model(), make_model()
    ref_opt = reference_optimizer(reference, **ADAMW)
    opt = galore_adamw(
        ours.named_parameters(), rank=RANK, update_proj_gap=GAP, scale=0.25, proj_type="std",
        layerwise=layerwise, **ADAMW,
    )
    assert isinstance(opt, LayerwiseOptimizer) == layerwise
    q_proj = dict(reference.named_parameters())["layers.0.attn.q_proj.weight"]
    projections = []
    for step, tokens in enumerate(batches(STEPS)):
        train(reference, ref_opt, [tokens], steps_in_backward=False)
        train(ours, opt, [tokens], steps_in_backward=layerwise)
        projections.append(ref_opt.state[q_proj]["projector"].ortho_matrix.clone())
        for (name, expected), (_, actual) in zip(reference.named_parameters(), ours.named_parameters()):
            torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0, msg=f"step {step + 1}: {name}")
        if layerwise:
            assert all(p.grad is None for p in ours.parameters()), "layer-wise left gradients behind"
    # the run really crossed projection updates (steps 0, 2, 4), and the weights really moved
    assert not torch.equal(projections[1], projections[2])
    assert not torch.equal(projections[3], projections[4])
    torch.testing.assert_close(projections[0], projections[1], atol=0, rtol=0)
    assert not torch.equal(q_proj, make_model().layers[0].attn.q_proj.weight)


def test_adafactor_matches_galore_torch_adafactor():
    reference, ours = make_model(), make_model()
    targets = [p for n, p in reference.named_parameters() if n.split(".")[-2] in GALORE_TARGETS]
    regular = [p for n, p in reference.named_parameters() if n.split(".")[-2] not in GALORE_TARGETS]
    ref_opt = galore_torch.GaLoreAdafactor(
        [{"params": regular}, {"params": targets, "rank": RANK, "update_proj_gap": GAP, "scale": 0.25, "proj_type": "std"}],
        lr=1e-3, scale_parameter=False, relative_step=False,
    )
    opt = galore_adafactor(ours.named_parameters(), lr=1e-3, rank=RANK, update_proj_gap=GAP)
    data = batches(3)
    train(reference, ref_opt, data, steps_in_backward=False)
    train(ours, opt, data, steps_in_backward=False)
    for (name, expected), (_, actual) in zip(reference.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0, msg=name)


def roundtrip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize(
    "builder, proj_type, layerwise",
    [
        (galore_adamw, "std", False),
        (galore_adamw, "std", True),
        (galore_adamw, "full", False),
        (galore_adafactor, "std", True),
    ],
    ids=["adamw", "adamw-layerwise", "adamw-full-projection", "adafactor-layerwise"],
)
def test_state_survives_weights_only_save_and_load(builder, proj_type, layerwise):
    """Stop after 3 steps, reload model + optimizer state, continue: same as never stopping.

    Step 4 (state step 3) uses the restored projection matrix without recomputing it, so a
    projector that came back wrong or missing would show.
    """
    kwargs = dict(lr=1e-3, rank=RANK, update_proj_gap=GAP, proj_type=proj_type, layerwise=layerwise)
    data = batches(6)
    straight = make_model()
    straight_opt = builder(straight.named_parameters(), **kwargs)
    train(straight, straight_opt, data, steps_in_backward=layerwise)

    first = make_model()
    first_opt = builder(first.named_parameters(), **kwargs)
    train(first, first_opt, data[:3], steps_in_backward=layerwise)
    saved_model, saved_opt = roundtrip(first.state_dict()), roundtrip(first_opt.state_dict())
    if layerwise:
        first_opt.remove_hooks()  # the stopped run's optimizer must not step the resumed model
    if layerwise:
        projector = saved_opt["layers.0.attn.q_proj.weight"]["state"][0]["projector"]
    else:
        galore_group = saved_opt["param_groups"][1]
        assert galore_group["param_names"][0] == "layers.0.attn.q_proj.weight"
        projector = saved_opt["state"][galore_group["params"][0]]["projector"]
    assert projector["proj_type"] == proj_type and projector["rank"] == RANK
    assert projector["ortho_matrix"] is not None

    resumed = make_model()
    resumed.load_state_dict(saved_model)
    resumed_opt = builder(resumed.named_parameters(), **kwargs)
    resumed_opt.load_state_dict(saved_opt)
    train(resumed, resumed_opt, data[3:], steps_in_backward=layerwise)
    for (name, expected), (_, actual) in zip(straight.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(actual, expected, atol=0, rtol=0, msg=name)


def test_galore_torch_state_alone_does_not_load_with_weights_only():
    """Why the serialisation exists: galore-torch keeps a Python object in optimizer state."""
    model = make_model()
    optimizer = reference_optimizer(model, lr=1e-3)
    train(model, optimizer, batches(1), steps_in_backward=False)
    with pytest.raises(pickle.UnpicklingError):
        roundtrip(optimizer.state_dict())


def test_layerwise_optimizer_follows_one_lr_scheduler_and_resumes_it():
    model = make_model()
    optimizer = galore_adamw(model.named_parameters(), lr=1.0, rank=RANK, layerwise=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    train(model, optimizer, batches(1), steps_in_backward=True)
    optimizer.step()
    scheduler.step()
    lrs = {o.param_groups[0]["lr"] for o in optimizer.optimizers.values()}
    assert lrs == {0.5}
    other = galore_adamw(make_model().named_parameters(), lr=1.0, rank=RANK, layerwise=True)
    other.load_state_dict(roundtrip(optimizer.state_dict()))
    resumed = torch.optim.lr_scheduler.LambdaLR(other, lambda step: 1.0 / (step + 1), last_epoch=1)
    assert {o.param_groups[0]["lr"] for o in other.optimizers.values()} == {1.0 / 3}
    assert resumed.last_epoch == 2


def test_split_puts_the_study_targets_under_galore_and_the_rest_in_plain_adamw():
    model = make_model()
    galore, other = split_galore_params(model.named_parameters())
    assert len(galore) == 4 * 7 and all(p.dim() == 2 for _, p in galore)
    assert {n.split(".")[-2] for n, _ in galore} == set(GALORE_TARGETS)
    assert {n for n, _ in other} >= {"tok_embeddings.weight", "norm.scale", "layers.0.sa_norm.scale"}
    optimizer = galore_adamw(model.named_parameters())
    plain, projected = optimizer.param_groups
    assert "rank" not in plain and len(plain["params"]) == len(other)
    assert (projected["rank"], projected["update_proj_gap"], projected["scale"], projected["proj_type"]) == (
        128, 200, 0.25, "std",
    )


def test_a_misspelled_target_names_the_model_modules():
    with pytest.raises(ValueError, match=r"\['o_proj'\] match no 2-D weight.*output_proj"):
        galore_adamw(make_model().named_parameters(), target_modules=["q_proj", "o_proj"])


def test_bare_parameters_are_refused_with_the_reason():
    with pytest.raises(TypeError, match="named_parameters"):
        galore_adamw(make_model().parameters())


def test_adamw8bit_says_it_needs_cuda_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs the 8-bit optimizer")
    with pytest.raises(RuntimeError, match="CUDA only.*galore_adamw"):
        galore_adamw8bit(make_model().named_parameters())
