"""Samplers: full DDPM, DDIM and DPM-Solver++ loops against diffusers' schedulers, plus the
sampling contract."""

import inspect

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

import minild
from minild.testing import seeded, toy_eps

T = 1000
SHAPE = (2, 1, 4, 4)
TOLERANCE = 1e-5

# Each case: our schedule's parameters, and the diffusers config that should give the same betas.
SCHEDULES = {
    "linear": ({}, {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}),
    "cosine": ({}, None),  # the seeds' cosine: diffusers runs our betas via trained_betas
    "squaredcos_cap_v2": (
        {"min_beta": 0.0, "max_beta": 0.999, "dtype": "float64"},
        {"beta_schedule": "squaredcos_cap_v2"},
    ),
}


def our_schedule(case):
    params, _ = SCHEDULES[case]
    name = "linear" if case == "linear" else "cosine"
    return minild.create("schedule", name, num_timesteps=T, **params)


def diffusers_betas(case, schedule):
    _, config = SCHEDULES[case]
    return config if config is not None else {"trained_betas": schedule.betas.numpy()}


def diffusers_ddpm(case, schedule, *, clip_sample, variance_type="fixed_small"):
    return DDPMScheduler(
        num_train_timesteps=T,
        **diffusers_betas(case, schedule),
        variance_type=variance_type,
        clip_sample=clip_sample,
        clip_sample_range=1.0,
        prediction_type="epsilon",
        thresholding=False,
        timestep_spacing="leading",
        steps_offset=0,
        rescale_betas_zero_snr=False,
    )


def diffusers_ddim(case, schedule, *, clip_sample):
    return DDIMScheduler(
        num_train_timesteps=T,
        **diffusers_betas(case, schedule),
        clip_sample=clip_sample,
        clip_sample_range=1.0,
        set_alpha_to_one=True,
        prediction_type="epsilon",
        thresholding=False,
        timestep_spacing="leading",
        steps_offset=0,
        rescale_betas_zero_snr=False,
    )


def diffusers_loop(scheduler, num_inference_steps, generator, **step_kwargs):
    """The loop a diffusers pipeline runs: x_T drawn with the generator, then one step per timestep."""
    x = torch.randn(SHAPE, generator=generator)
    scheduler.set_timesteps(num_inference_steps)
    for t in scheduler.timesteps:
        x = scheduler.step(toy_eps(x, t.repeat(SHAPE[0])), t, x, generator=generator, **step_kwargs).prev_sample
    return x


# --- Oracle: DDPM ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", SCHEDULES)
@pytest.mark.parametrize("clip_sample", ["clip", "none"])
def test_ddpm_matches_diffusers_full_loop(case, clip_sample):
    schedule = our_schedule(case)
    sampler = minild.create("sampler", "ddpm", schedule, variance_type="fixed_small", clip_sample=clip_sample)
    ours = sampler.sample(toy_eps, SHAPE, num_inference_steps=T, generator=seeded())
    scheduler = diffusers_ddpm(case, schedule, clip_sample=clip_sample == "clip")
    theirs = diffusers_loop(scheduler, T, seeded())
    assert (ours - theirs).abs().max() <= TOLERANCE


def test_ddpm_clipping_changes_the_samples():
    schedule = our_schedule("linear")
    clipped, unclipped = (
        minild.create("sampler", "ddpm", schedule, clip_sample=clip).sample(toy_eps, SHAPE, generator=seeded())
        for clip in ("clip", "none")
    )
    assert (clipped - unclipped).abs().max() > 1e-3  # so the oracle cases above test two different paths


def test_ddpm_fixed_large_matches_diffusers_full_loop():
    schedule = our_schedule("cosine")
    sampler = minild.create("sampler", "ddpm", schedule, variance_type="fixed_large", clip_sample="clip")
    ours = sampler.sample(toy_eps, SHAPE, generator=seeded())
    scheduler = diffusers_ddpm("cosine", schedule, clip_sample=True, variance_type="fixed_large")
    assert (ours - diffusers_loop(scheduler, T, seeded())).abs().max() <= TOLERANCE


@pytest.mark.parametrize("case", SCHEDULES)
@pytest.mark.parametrize("num_inference_steps", [37, 100])
def test_ddpm_fewer_steps_matches_diffusers_leading_spacing(case, num_inference_steps):
    schedule = our_schedule(case)
    sampler = minild.create("sampler", "ddpm", schedule, clip_sample="clip")
    ours = sampler.sample(toy_eps, SHAPE, num_inference_steps=num_inference_steps, generator=seeded())
    scheduler = diffusers_ddpm(case, schedule, clip_sample=True)
    assert (ours - diffusers_loop(scheduler, num_inference_steps, seeded())).abs().max() <= TOLERANCE


def test_ddpm_list_of_generators_matches_diffusers():
    schedule = our_schedule("linear")
    sampler = minild.create("sampler", "ddpm", schedule, clip_sample="none")
    ours = sampler.sample(toy_eps, SHAPE, num_inference_steps=20, generator=[seeded(1), seeded(2)])
    generators = [seeded(1), seeded(2)]
    latents = torch.cat([torch.randn((1, *SHAPE[1:]), generator=g) for g in generators])
    scheduler = diffusers_ddpm("linear", schedule, clip_sample=False)
    scheduler.set_timesteps(20)
    for t in scheduler.timesteps:
        latents = scheduler.step(toy_eps(latents, t.repeat(2)), t, latents, generator=generators).prev_sample
    assert (ours - latents).abs().max() <= TOLERANCE


# --- Oracle: DDIM ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", SCHEDULES)
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("clip_sample", ["none", "clip", "clip_rederive_eps"])
def test_ddim_matches_diffusers_full_loop(case, eta, clip_sample):
    schedule = our_schedule(case)
    sampler = minild.create("sampler", "ddim", schedule, eta=eta, clip_sample=clip_sample)
    ours = sampler.sample(toy_eps, SHAPE, num_inference_steps=50, generator=seeded())
    scheduler = diffusers_ddim(case, schedule, clip_sample=clip_sample != "none")
    theirs = diffusers_loop(
        scheduler, 50, seeded(), eta=eta, use_clipped_model_output=clip_sample == "clip_rederive_eps"
    )
    assert (ours - theirs).abs().max() <= TOLERANCE


def test_ddim_clip_modes_give_three_different_samplers():
    schedule = our_schedule("linear")
    samples = [
        minild.create("sampler", "ddim", schedule, clip_sample=clip).sample(toy_eps, SHAPE, generator=seeded())
        for clip in ("none", "clip", "clip_rederive_eps")
    ]
    assert (samples[0] - samples[1]).abs().max() > 1e-3
    assert (samples[1] - samples[2]).abs().max() > 1e-3


def test_ddim_odd_step_count_matches_diffusers():
    schedule = our_schedule("linear")
    sampler = minild.create("sampler", "ddim", schedule, eta=0.5)
    ours = sampler.sample(toy_eps, SHAPE, num_inference_steps=7, generator=seeded())
    theirs = diffusers_loop(diffusers_ddim("linear", schedule, clip_sample=False), 7, seeded(), eta=0.5)
    assert (ours - theirs).abs().max() <= TOLERANCE


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_with_sdxl_spacing_matches_diffusers(eta):
    # Stable Diffusion / SDXL: scaled-linear betas, timesteps 981, …, 1 and a last step ending on ᾱ_0.
    schedule = minild.create("schedule", "scaled_linear", num_timesteps=T, beta_start=0.00085, beta_end=0.012)
    sampler = minild.create("sampler", "ddim", schedule, eta=eta, steps_offset=1, final_alpha_cumprod="first")
    assert sampler.timesteps(50)[0] == 981 and sampler.timesteps(50)[-1] == 1
    ours = sampler.sample(toy_eps, SHAPE, num_inference_steps=50, generator=seeded())
    scheduler = DDIMScheduler(
        num_train_timesteps=T, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
    )
    theirs = diffusers_loop(scheduler, 50, seeded(), eta=eta)
    assert (ours - theirs).abs().max() <= TOLERANCE


def test_ddim_steps_offset_past_the_schedule_raises():
    sampler = minild.create("sampler", "ddim", our_schedule("linear"), steps_offset=1)
    with pytest.raises(ValueError, match="steps_offset"):
        sampler.timesteps(T)


def test_ddim_step_is_one_iteration_of_sample():
    sampler = minild.create("sampler", "ddim", our_schedule("linear"), eta=1.0)
    x_T = torch.randn(SHAPE, generator=seeded(1))
    ours = sampler.sample(toy_eps, SHAPE, num_inference_steps=4, latents=x_T, generator=seeded())
    x, generator, timesteps = x_T, seeded(), sampler.timesteps(4)
    for t, t_prev in zip(timesteps, timesteps[1:] + [None]):
        x, _ = sampler.step(toy_eps(x, torch.full((SHAPE[0],), t)), t, x, t_prev=t_prev, generator=generator)
    assert torch.equal(ours, x)


# --- Oracle: DPM-Solver++(2M) ---------------------------------------------------------------

DATA_STD = 0.5  # the toy data distribution N(0, DATA_STD² I) of gaussian_data_eps


def gaussian_data_eps(schedule, wiggle=0.05):
    """The exact eps-model E[ε | x_t] of data drawn from N(0, DATA_STD² I), plus an optional
    nonlinear wiggle: a predictor with the scale of a trained one, so x̂0 stays O(1)."""
    alphas_cumprod = schedule.alphas_cumprod

    def eps_model(x, t):
        alpha_prod = alphas_cumprod[t].view(-1, 1, 1, 1)
        std = (alpha_prod * DATA_STD**2 + 1 - alpha_prod).sqrt()  # of x_t
        return (1 - alpha_prod).sqrt() * (x / std**2 + wiggle * torch.sin(3 * x))

    return eps_model


def diffusers_dpm_solver_pp(case, schedule, *, timestep_spacing="linspace", final_sigmas_type="zero", steps_offset=0):
    return DPMSolverMultistepScheduler(
        num_train_timesteps=T,
        **diffusers_betas(case, schedule),
        solver_order=2,
        algorithm_type="dpmsolver++",
        solver_type="midpoint",
        lower_order_final=True,
        euler_at_final=False,
        timestep_spacing=timestep_spacing,
        final_sigmas_type=final_sigmas_type,
        prediction_type="epsilon",
        thresholding=False,
        use_karras_sigmas=False,
        use_lu_lambdas=False,
        lambda_min_clipped=-float("inf"),
        steps_offset=steps_offset,
        rescale_betas_zero_snr=False,
    )


def diffusers_deterministic_loop(scheduler, model_fn, num_inference_steps, latents):
    scheduler.set_timesteps(num_inference_steps)
    x = latents
    for t in scheduler.timesteps:
        x = scheduler.step(model_fn(x, t.repeat(x.shape[0])), t, x).prev_sample
    return x


@pytest.mark.parametrize("case", SCHEDULES)
@pytest.mark.parametrize("num_inference_steps", [10, 20, 25])
@pytest.mark.parametrize("timestep_spacing", ["linspace", "trailing"])
def test_dpm_solver_pp_matches_diffusers_full_loop(case, num_inference_steps, timestep_spacing):
    schedule = our_schedule(case)
    sampler = minild.create("sampler", "dpm_solver_pp", schedule, timestep_spacing=timestep_spacing)
    model_fn = gaussian_data_eps(schedule)
    latents = torch.randn(SHAPE, generator=seeded())
    ours = sampler.sample(model_fn, SHAPE, num_inference_steps=num_inference_steps, latents=latents)
    scheduler = diffusers_dpm_solver_pp(case, schedule, timestep_spacing=timestep_spacing)
    theirs = diffusers_deterministic_loop(scheduler, model_fn, num_inference_steps, latents)
    assert theirs.abs().max() > 0.1  # real samples, not a chain collapsed to zero
    assert (ours - theirs).abs().max() <= TOLERANCE


@pytest.mark.parametrize("num_inference_steps", [1, 2, 7, 14, 15, 50])
def test_dpm_solver_pp_sigma_min_and_step_counts_around_lower_order_final_match_diffusers(num_inference_steps):
    schedule = our_schedule("cosine")
    model_fn = gaussian_data_eps(schedule)
    latents = torch.randn(SHAPE, generator=seeded(1))
    for final_sigmas_type in ("zero", "sigma_min"):
        sampler = minild.create("sampler", "dpm_solver_pp", schedule, final_sigmas_type=final_sigmas_type)
        ours = sampler.sample(model_fn, SHAPE, num_inference_steps=num_inference_steps, latents=latents)
        scheduler = diffusers_dpm_solver_pp("cosine", schedule, final_sigmas_type=final_sigmas_type)
        theirs = diffusers_deterministic_loop(scheduler, model_fn, num_inference_steps, latents)
        assert (ours - theirs).abs().max() <= TOLERANCE, final_sigmas_type


@pytest.mark.parametrize("timestep_spacing", ["linspace", "trailing"])
def test_dpm_solver_pp_timesteps_are_diffusers(timestep_spacing):
    sampler = minild.create("sampler", "dpm_solver_pp", our_schedule("linear"), timestep_spacing=timestep_spacing)
    scheduler = diffusers_dpm_solver_pp("linear", None, timestep_spacing=timestep_spacing)
    for n in (1, 3, 10, 20, 25, 999, 1000):
        scheduler.set_timesteps(n)
        assert sampler.timesteps(n) == scheduler.timesteps.tolist(), n
    assert sampler.timesteps(20)[0] == T - 1  # the chain starts where x_T ~ N(0, I) lives


@pytest.mark.parametrize("steps_offset", [0, 1])
def test_dpm_solver_pp_leading_spacing_with_steps_offset_matches_diffusers(steps_offset):
    schedule = our_schedule("linear")
    sampler = minild.create("sampler", "dpm_solver_pp", schedule, timestep_spacing="leading", steps_offset=steps_offset)
    scheduler = diffusers_dpm_solver_pp("linear", schedule, timestep_spacing="leading", steps_offset=steps_offset)
    for n in (1, 3, 10, 30, 500):
        scheduler.set_timesteps(n)
        assert sampler.timesteps(n) == scheduler.timesteps.tolist(), n
    model_fn, latents = gaussian_data_eps(schedule), torch.randn(SHAPE, generator=seeded(2))
    ours = sampler.sample(model_fn, SHAPE, num_inference_steps=12, latents=latents)
    theirs = diffusers_deterministic_loop(scheduler, model_fn, 12, latents)
    assert (ours - theirs).abs().max() <= TOLERANCE


def test_dpm_solver_pp_in_20_steps_solves_the_probability_flow_ode():
    """For Gaussian data the ODE's solution is known: x_t / std(x_t) is constant along it, so a
    chain started at timestep s ends at x_0 = x_s · DATA_STD / std(x_s). Second order in 20
    steps must be far closer to it than DDIM (first order) in 20 steps."""
    schedule = our_schedule("cosine")
    model_fn = gaussian_data_eps(schedule, wiggle=0.0)
    latents = torch.randn((64, 1, 4, 4), generator=seeded())

    def exact(start):
        alpha_prod = schedule.alphas_cumprod[start]
        return latents * DATA_STD / (alpha_prod * DATA_STD**2 + 1 - alpha_prod).sqrt()

    dpm = minild.create("sampler", "dpm_solver_pp", schedule)
    ddim = minild.create("sampler", "ddim", schedule)
    dpm_error = (dpm.sample(model_fn, latents.shape, num_inference_steps=20, latents=latents) - exact(T - 1)).abs().max()
    ddim_error = (ddim.sample(model_fn, latents.shape, num_inference_steps=20, latents=latents) - exact(950)).abs().max()
    assert dpm_error < 0.02  # measured 0.0097; the samples span about ±1.5
    assert dpm_error < 0.1 * ddim_error  # measured 0.15 for DDIM


# --- The sampling contract ------------------------------------------------------------------


def test_builtin_samplers_are_registered():
    assert {"ddpm", "ddim", "dpm_solver_pp"} <= set(minild.available("sampler"))


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpm_solver_pp"])
def test_sampler_parameters_are_keyword_only_annotated_plain_data(name):
    factory = minild.plugins.lookup("sampler", name).factory
    parameters = list(inspect.signature(factory).parameters.values())
    assert parameters[0].name == "schedule"
    for parameter in parameters[1:]:
        assert parameter.kind is inspect.Parameter.KEYWORD_ONLY, parameter.name
        assert parameter.annotation is not inspect.Parameter.empty, parameter.name
        assert isinstance(parameter.default, (int, float, str, type(None))), parameter.name


@pytest.mark.parametrize("name, params", [("ddpm", {}), ("ddim", {"eta": 1.0}), ("dpm_solver_pp", {})])
def test_same_seed_gives_the_same_samples(name, params):
    sampler = minild.create("sampler", name, our_schedule("linear"), **params)
    first = sampler.sample(toy_eps, SHAPE, num_inference_steps=20, generator=seeded(7))
    second = sampler.sample(toy_eps, SHAPE, num_inference_steps=20, generator=seeded(7))
    third = sampler.sample(toy_eps, SHAPE, num_inference_steps=20, generator=seeded(8))
    assert torch.equal(first, second)
    assert not torch.equal(first, third)


@pytest.mark.parametrize("name, params", [("ddpm", {}), ("ddim", {"eta": 1.0}), ("dpm_solver_pp", {})])
def test_list_of_generators_makes_each_image_independent_of_its_batch(name, params):
    sampler = minild.create("sampler", name, our_schedule("linear"), **params)
    batch = sampler.sample(toy_eps, (3, 1, 4, 4), num_inference_steps=20, generator=[seeded(s) for s in (1, 2, 3)])
    alone = sampler.sample(toy_eps, (1, 1, 4, 4), num_inference_steps=20, generator=[seeded(2)])
    torch.testing.assert_close(batch[1:2], alone, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name, num_inference_steps", [("ddpm", 10), ("ddim", None)])
def test_callback_receives_every_step(name, num_inference_steps):
    sampler = minild.create("sampler", name, our_schedule("linear"))
    steps = []
    out = sampler.sample(
        toy_eps, SHAPE, num_inference_steps=num_inference_steps, generator=seeded(), callback=steps.append
    )
    n = num_inference_steps or 50  # DDIM's default
    assert [info["i"] for info in steps] == list(range(n))
    assert [info["t"] for info in steps] == [(T // n) * k for k in reversed(range(n))]
    assert all(info["x"].shape == SHAPE and info["x0_pred"].shape == SHAPE for info in steps)
    assert torch.equal(steps[-1]["x"], out)


def test_dpm_solver_pp_callback_receives_every_step():
    sampler = minild.create("sampler", "dpm_solver_pp", our_schedule("linear"))
    steps = []
    out = sampler.sample(toy_eps, SHAPE, generator=seeded(), callback=steps.append)
    assert [info["i"] for info in steps] == list(range(20))  # the default step count
    assert [info["t"] for info in steps] == sampler.timesteps(20)
    assert torch.equal(steps[-1]["x"], out) and torch.equal(steps[-1]["x0_pred"], out)  # σ = 0 at the end


def test_ddpm_takes_every_training_step_by_default():
    sampler = minild.create("sampler", "ddpm", minild.create("schedule", "linear", num_timesteps=25))
    steps = []
    sampler.sample(toy_eps, SHAPE, generator=seeded(), callback=steps.append)
    assert [info["t"] for info in steps] == list(reversed(range(25)))


def test_ddim_eta0_is_deterministic_whatever_the_generator():
    sampler = minild.create("sampler", "ddim", our_schedule("linear"), eta=0.0)
    latents = torch.randn(SHAPE, generator=seeded(3))
    outputs = [sampler.sample(toy_eps, SHAPE, latents=latents, generator=g) for g in (None, seeded(1), seeded(2))]
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpm_solver_pp"])
@pytest.mark.parametrize("num_inference_steps", [0, -5, T + 1, 2.5, True])
def test_bad_num_inference_steps_raises(name, num_inference_steps):
    sampler = minild.create("sampler", name, our_schedule("linear"))
    with pytest.raises(ValueError, match="num_inference_steps"):
        sampler.sample(toy_eps, SHAPE, num_inference_steps=num_inference_steps)


@pytest.mark.parametrize(
    "name, params",
    [
        ("ddpm", {"variance_type": "learned"}),
        ("ddpm", {"clip_sample": True}),
        ("ddpm", {"clip_sample": "clip_rederive_eps"}),
        ("ddpm", {"clip_sample_range": 0.0}),
        ("ddim", {"eta": -1.0}),
        ("ddim", {"clip_sample": "dynamic"}),
        ("ddim", {"clip_sample_range": -1.0}),
        ("ddim", {"steps_offset": -1}),
        ("ddim", {"final_alpha_cumprod": True}),
        ("ddpm", {"steps_offset": -1}),
        ("dpm_solver_pp", {"timestep_spacing": "karras"}),
        ("dpm_solver_pp", {"steps_offset": 1.5}),
        ("dpm_solver_pp", {"final_sigmas_type": 0}),
    ],
)
def test_bad_sampler_parameters_raise(name, params):
    with pytest.raises(ValueError):
        minild.create("sampler", name, our_schedule("linear"), **params)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpm_solver_pp"])
def test_bad_shapes_and_generators_raise(name):
    sampler = minild.create("sampler", name, our_schedule("linear"))
    with pytest.raises(ValueError, match="shape"):
        sampler.sample(toy_eps, (4,), num_inference_steps=2)
    with pytest.raises(ValueError, match="latents"):
        sampler.sample(toy_eps, SHAPE, num_inference_steps=2, latents=torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="generators"):
        sampler.sample(toy_eps, SHAPE, num_inference_steps=2, generator=[seeded()])


def test_sampling_follows_the_dtype_of_the_latents():
    sampler = minild.create("sampler", "ddim", our_schedule("linear"))
    latents = torch.randn(SHAPE, generator=seeded(), dtype=torch.float64)
    assert sampler.sample(toy_eps, SHAPE, num_inference_steps=5, latents=latents).dtype == torch.float64
