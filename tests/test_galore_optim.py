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
@pytest.mark.parametrize("svd", ["full", "randomized"])
def test_state_survives_weights_only_save_and_load(builder, proj_type, layerwise, svd):
    """Stop after 3 steps, reload model + optimizer state, continue: same as never stopping.

    Step 4 (state step 3) uses the restored projection matrix without recomputing it, so a
    projector that came back wrong or missing would show; the updates at steps 4 and 6 follow.
    Randomized: bit-identical too (a sketch is a function of the parameter's name, not of a
    generator's position), whatever the resumed process's global RNG.
    """
    kwargs = dict(lr=1e-3, rank=RANK, update_proj_gap=GAP, proj_type=proj_type, layerwise=layerwise, svd=svd)
    if svd == "randomized":
        kwargs.update(svd_oversample=4, svd_power_iters=1)
    data = batches(7)
    straight = make_model()
    straight_opt = builder(straight.named_parameters(), **kwargs)
    train(straight, straight_opt, data, steps_in_backward=layerwise)

    first = make_model()
    first_opt = builder(first.named_parameters(), **kwargs)
    train(first, first_opt, data[:3], steps_in_backward=layerwise)
    saved_model, saved_opt = roundtrip(first.state_dict()), roundtrip(first_opt.state_dict())
    if layerwise:
        first_opt.remove_hooks()  # the stopped run's optimizer must not step the resumed model
        projector = saved_opt["layers.0.attn.q_proj.weight"]["state"][0]["projector"]
    else:
        galore_group = saved_opt["param_groups"][1]
        assert galore_group["param_names"][0] == "layers.0.attn.q_proj.weight"
        projector = saved_opt["state"][galore_group["params"][0]]["projector"]
    assert projector["proj_type"] == proj_type and projector["rank"] == RANK
    assert projector["ortho_matrix"] is not None and projector["svd"] == svd
    if svd == "randomized":
        assert (projector["svd_oversample"], projector["svd_power_iters"]) == (4, 1)
        assert isinstance(projector["svd_seed"], int)

    torch.manual_seed(999)  # the resumed process's global RNG is elsewhere: must not matter
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


# --------------------------------------------------------------------------------------------
# svd="randomized": the projection update by a seeded randomized range finder
# --------------------------------------------------------------------------------------------

from galore_torch.galore_projector import GaLoreProjector  # noqa: E402

from components.optim.galore import RandomizedGaLoreProjector, projector_from_dict  # noqa: E402


def gapped(m: int, n: int, rank: int, gap: float = 100.0, seed: int = 0) -> torch.Tensor:
    """An m x n fp32 matrix with singular values 10 .. 1 (log-spaced), divided by ``gap`` after
    the first ``rank``: a decaying spectrum with a clear gap at ``rank``."""
    generator = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=generator, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=generator, dtype=torch.float64)).Q
    s = torch.logspace(1, 0, k, dtype=torch.float64)
    s[rank:] /= gap
    return ((u * s) @ v.T).float()


def as_list(matrices):
    return list(matrices) if isinstance(matrices, list) else [matrices]


def subspace_error(expected: torch.Tensor, actual: torch.Tensor) -> float:
    """Spectral norm of the difference of the orthogonal projectors onto the two subspaces (the
    sine of the largest principal angle); rows or columns, whichever is the short side."""
    e, a = expected.double(), actual.double()
    if e.shape[0] < e.shape[1]:
        e, a = e.T, a.T
    return torch.linalg.matrix_norm(e @ e.T - a @ a.T, ord=2).item()


SHAPES = [(96, 40), (40, 96), (64, 64)]


@pytest.mark.parametrize("shape", SHAPES, ids=["tall", "wide", "square"])
@pytest.mark.parametrize("kind", ["left", "right", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_randomized_projection_spans_the_exact_top_subspace(shape, kind, dtype):
    matrix = gapped(*shape, RANK).to(dtype)
    exact = GaLoreProjector(RANK).get_orthogonal_matrix(matrix, RANK, kind)
    randomized = RandomizedGaLoreProjector(RANK).get_orthogonal_matrix(matrix, RANK, kind)
    assert isinstance(randomized, list) == (kind == "full")
    tolerance = 1e-3 if dtype == torch.float32 else 3e-2  # bf16: the outputs' own rounding
    for e, r in zip(as_list(exact), as_list(randomized), strict=True):
        assert (r.shape, r.dtype, r.device) == (e.shape, e.dtype, e.device)
        assert subspace_error(e, r) < tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("shape, rank", [((6, 20), RANK), ((20, 6), RANK), ((24, 16), 12)])
def test_randomized_projection_shapes_and_dtypes_equal_galore_torch_even_at_full_rank(dtype, shape, rank):
    """rank >= the short side (the sketch is then the whole range), and rank + oversample above
    it: the same shapes and dtypes as galore-torch's, and still the same subspace."""
    matrix = torch.randn(*shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    for kind in ("left", "right", "full"):
        exact = as_list(GaLoreProjector(rank).get_orthogonal_matrix(matrix, rank, kind))
        randomized = as_list(RandomizedGaLoreProjector(rank).get_orthogonal_matrix(matrix, rank, kind))
        assert [(r.shape, r.dtype) for r in randomized] == [(e.shape, e.dtype) for e in exact]
        if rank >= min(shape) and dtype != torch.bfloat16:
            for e, r in zip(exact, randomized):
                assert subspace_error(e, r) < 1e-4


def test_randomized_projection_is_deterministic_and_leaves_the_global_rng_alone():
    matrix = gapped(64, 40, RANK)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = RandomizedGaLoreProjector(RANK, seed=7).get_orthogonal_matrix(matrix, RANK, "full")
    second = RandomizedGaLoreProjector(RANK, seed=7).get_orthogonal_matrix(matrix, RANK, "full")
    assert torch.equal(torch.get_rng_state(), before), "the projection drew from the global RNG"
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    # the sketch is the parameter's: another seed draws another one
    other = RandomizedGaLoreProjector(RANK, seed=8).get_orthogonal_matrix(matrix, RANK, "left")
    assert not torch.equal(other, first[0])
    # through galore-torch's project() (std on a tall matrix: 'right'), at any step
    projector = RandomizedGaLoreProjector(RANK, proj_type="std", seed=7)
    projector.project(matrix, 4)
    assert torch.equal(projector.ortho_matrix, first[1])
    assert torch.equal(torch.get_rng_state(), before)


def test_randomized_projection_keeps_signs_when_the_subspace_drifts_slowly():
    """Why the sketch does not change between updates: galore-torch carries Adam's moments over
    a projection update in the old basis, so a vector whose sign flipped would have its momentum
    negated. Like torch.linalg.svd, the fixed-sketch projection keeps the signs."""
    matrix, generator = gapped(96, 40, RANK, gap=10.0), torch.Generator().manual_seed(5)
    projector, previous = RandomizedGaLoreProjector(RANK, seed=3), None
    for _ in range(5):
        matrix = matrix + 1e-3 * torch.randn(matrix.shape, generator=generator)
        basis = projector.get_orthogonal_matrix(matrix, RANK, "right")
        if previous is not None:
            overlaps = (previous * basis).sum(dim=1)
            assert (overlaps > 0.99).all(), overlaps
        previous = basis


def test_optimizer_step_with_a_projection_update_leaves_the_global_rng_alone():
    model = make_model()
    optimizer = galore_adamw(model.named_parameters(), lr=1e-3, rank=RANK, update_proj_gap=GAP, svd="randomized")
    loss_of(model, batches(1)[0]).backward()
    before = torch.get_rng_state()
    optimizer.step()
    assert torch.equal(torch.get_rng_state(), before)
    projectors = [s["projector"] for s in optimizer.state.values() if "projector" in s]
    assert len(projectors) == 4 * 7 and all(isinstance(p, RandomizedGaLoreProjector) for p in projectors)
    assert len({p.seed for p in projectors}) == len(projectors)
    assert all((p.oversample, p.power_iters) == (8, 2) for p in projectors)


def test_randomized_is_the_same_in_both_modes_and_trains_like_full():
    """Seeds come from parameter names, so one optimizer and the layer-wise mode compute the same
    sketches. Against the full SVD the weights differ (on these random batches consecutive
    top-8 subspaces barely overlap, so any other basis, even the exact one with other signs,
    moves the run elsewhere); the loss reached is what to compare."""
    data = batches(STEPS)
    runs, losses = {}, {}
    for name, svd, layerwise in [("one", "randomized", False), ("layerwise", "randomized", True), ("full", "full", False)]:
        model = make_model()
        optimizer = galore_adamw(
            model.named_parameters(), rank=RANK, update_proj_gap=GAP, svd=svd, layerwise=layerwise, **ADAMW
        )
        train(model, optimizer, data, steps_in_backward=layerwise)
        with torch.no_grad():
            losses[name] = sum(loss_of(model, tokens).item() for tokens in data) / len(data)
        runs[name] = dict(model.named_parameters())
    for name, expected in runs["one"].items():
        torch.testing.assert_close(runs["layerwise"][name], expected, atol=ATOL, rtol=0, msg=name)
    q = "layers.0.attn.q_proj.weight"
    assert not torch.equal(runs["full"][q], runs["one"][q])  # really another code path
    with torch.no_grad():
        untrained = sum(loss_of(make_model(), tokens).item() for tokens in data) / len(data)
    assert losses["one"] < untrained - 0.1 and losses["full"] < untrained - 0.1, (untrained, losses)
    assert abs(losses["one"] - losses["full"]) < 0.1 * (untrained - losses["full"]), (untrained, losses)


def test_a_checkpoint_from_before_the_svd_option_loads_as_full():
    """Projector dicts and param groups without the svd keys: galore-torch's projector, and the
    run continues exactly as the full-SVD run that never stopped."""
    kwargs = dict(lr=1e-3, rank=RANK, update_proj_gap=GAP)
    data = batches(6)
    straight = make_model()
    train(straight, galore_adamw(straight.named_parameters(), **kwargs), data, steps_in_backward=False)

    first = make_model()
    first_opt = galore_adamw(first.named_parameters(), **kwargs)
    train(first, first_opt, data[:3], steps_in_backward=False)
    saved_opt = roundtrip(first_opt.state_dict())
    for group in saved_opt["param_groups"]:
        for key in ("svd", "svd_oversample", "svd_power_iters"):
            group.pop(key, None)
    for param_state in saved_opt["state"].values():
        if "projector" in param_state:
            param_state["projector"].pop("svd")
    old = next(s["projector"] for s in saved_opt["state"].values() if "projector" in s)
    assert type(projector_from_dict(old)) is GaLoreProjector

    resumed = make_model()
    resumed.load_state_dict(roundtrip(first.state_dict()))
    resumed_opt = galore_adamw(resumed.named_parameters(), svd="randomized", **kwargs)
    resumed_opt.load_state_dict(saved_opt)  # the checkpoint's settings win, as torch's do
    assert resumed_opt.param_groups[1]["svd"] == "full"
    train(resumed, resumed_opt, data[3:], steps_in_backward=False)
    assert all(type(s["projector"]) is GaLoreProjector for s in resumed_opt.state.values() if "projector" in s)
    for (name, expected), (_, actual) in zip(straight.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(actual, expected, atol=0, rtol=0, msg=name)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(svd="fast"), r"svd must be 'full' or 'randomized', got 'fast'"),
        (dict(svd="randomized", svd_oversample=-1), r"svd_oversample must be an integer >= 0, got -1"),
        (dict(svd="randomized", svd_power_iters=-2), r"svd_power_iters must be an integer >= 0, got -2"),
        (dict(svd="randomized", svd_power_iters=1.5), r"svd_power_iters must be an integer >= 0, got 1.5"),
    ],
)
@pytest.mark.parametrize("builder", [galore_adamw, galore_adafactor])
def test_bad_svd_settings_are_refused_by_name(builder, kwargs, message):
    with pytest.raises(ValueError, match=message):
        builder(make_model().named_parameters(), **kwargs)
