"""DistributionTasks: sampled views against torchvision image by image, the samplers, the fused
path against the torch path, and bad input."""
import importlib.util
import math

import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

import mtdl_fast as mf
from mtdl_fast.ops import OPS

ALL_OPS = sorted({cls.name for cls in OPS.values()})
BILINEAR = InterpolationMode.BILINEAR


def photos(batch: int, channels: int = 3, height: int = 14, width: int = 19, seed: int = 0) -> torch.Tensor:
    """Fresh random uint8 images with smooth structure (so warps and blurs have something to move)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, channels, 4, 5, generator=g)
    smooth = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    detail = torch.rand(batch, channels, height, width, generator=g)
    return ((0.7 * smooth + 0.3 * detail) * 255).to(torch.uint8)


def reference_op(name: str, config: dict, p: dict, img: torch.Tensor, i: int) -> torch.Tensor:
    """torchvision applied to image i (float C, H, W) with op `name`'s sampled parameters."""
    s = {k: v[i] for k, v in p.items()}
    height, width = img.shape[-2:]
    if name == "identity":
        return img
    if name == "horizontal_flip":
        return TF.horizontal_flip(img)
    if name == "vertical_flip":
        return TF.vertical_flip(img)
    if name == "rotate":
        return TF.rotate(img, s["angle"].item(), BILINEAR, fill=config.get("fill"))
    if name == "affine":
        return TF.affine(img, s["angle"].item(), s["translate"].tolist(), s["scale"].item(), s["shear"].tolist(),
                         BILINEAR)
    if name == "resized_crop":
        top, left, h, w = (int(v) for v in s["box"].tolist())
        return TF.resized_crop(img, top, left, h, w, [height, width], BILINEAR, antialias=True)
    if name in ("brightness", "contrast", "saturation", "hue", "sharpness"):
        fn = getattr(TF, f"adjust_{name}")
        return fn(img, s[f"{name}_factor"].item())
    if name == "grayscale":
        return TF.rgb_to_grayscale(img, num_output_channels=img.shape[0])
    if name == "gaussian_blur":
        k = config["kernel_size"]
        return TF.gaussian_blur(img, [k, k], [s["sigma"].item()] * 2)
    if name == "erase":
        top, left, h, w = (int(v) for v in s["box"].tolist())
        return TF.erase(img, top, left, h, w, torch.tensor(float(config["value"])))
    if name == "invert":
        return TF.invert(img)
    if name == "solarize":
        return TF.solarize(img, s["threshold"].item())
    if name == "posterize":
        return TF.posterize(img, int(s["bits"].item()))
    raise KeyError(name)


def reference_views(tasks: mf.DistributionTasks, x: torch.Tensor, params: mf.TaskParams) -> torch.Tensor:
    base = TF.to_dtype(x, torch.float32, scale=True)
    views = []
    for spec, view_params in zip(tasks.specs, params.views):
        images = []
        for i in range(x.shape[0]):
            img = base[i]
            for op, p in zip(spec.ops, view_params):
                img = reference_op(type(op).name, op.config, p, img, i)
            images.append(img)
        views.append(torch.stack(images))
    return torch.stack(views)


DETERMINISTIC = [name for name in ALL_OPS if name != "gaussian_noise"]


@pytest.mark.parametrize("channels", [3, 1])
def test_every_task_matches_torchvision_image_by_image(channels):
    x = photos(5, channels, seed=channels)
    tasks = mf.DistributionTasks(DETERMINISTIC, seed=1, backend="torch")
    params = tasks.sample(5, (14, 19))
    got = tasks.apply(x, params)
    want = reference_views(tasks, x, params)
    for k, name in enumerate(tasks.names):
        tol = 1e-4 if name == "hue" else 1e-5
        assert (got[k] - want[k]).abs().max().item() <= tol, name


@pytest.mark.parametrize(
    "task",
    ["rotate+hue", "horizontal_flip+rotate+contrast+erase", "resized_crop+vertical_flip+posterize", "hue+rotate",
     "gaussian_blur+saturation+solarize", ("affine+brightness", {"angle": (-90.0, 90.0), "brightness_factor": 1.3})],
)
def test_composite_tasks_chain_torchvision_ops(task):
    x = photos(4, seed=7)
    tasks = mf.DistributionTasks([task], seed=3, backend="torch")
    params = tasks.sample(4, (14, 19))
    assert (tasks.apply(x, params) - reference_views(tasks, x, params)).abs().max().item() <= 1e-4


def test_float_input_equals_uint8_scaled():
    x = photos(3)
    tasks = mf.DistributionTasks(["rotate+contrast", "hue"], seed=0, backend="torch")
    params = tasks.sample(3, (14, 19))
    assert torch.equal(tasks.apply(x, params), tasks.apply(TF.to_dtype(x, torch.float32, scale=True), params))


def test_apply_is_deterministic_and_forward_draws_fresh_parameters():
    x = photos(4)
    tasks = mf.DistributionTasks(mf.DEFAULT_TASKS, seed=0, backend="torch")
    params = tasks.sample(4, (14, 19))
    assert torch.equal(tasks.apply(x, params), tasks.apply(x, params))
    first, second = tasks(x), tasks(x)
    assert not torch.equal(first[3], second[3])  # rotate draws new angles each call
    again = mf.DistributionTasks(mf.DEFAULT_TASKS, seed=0, backend="torch")
    again.sample(4, (14, 19))
    assert torch.equal(again(x)[3], first[3])  # same seed, same sequence of draws


def test_sampler_ranges_and_per_image_variety():
    tasks = mf.DistributionTasks(
        [("rotate", {"angle": (-10.0, 20.0)}), "resized_crop", "erase", ("posterize", {"bits": (3, 5)}), "hue"], seed=5
    )
    params = tasks.sample(256, (32, 40))
    angle = params.views[0][0]["angle"]
    assert angle.min() >= -10 and angle.max() <= 20 and angle.std() > 5
    top, left, h, w = params.views[1][0]["box"].unbind(-1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 40).all()
    area = h * w / (32 * 40)
    assert area.min() >= 0.2 and area.max() <= 1.0 and area.std() > 0.05
    et, el, eh, ew = params.views[2][0]["box"].unbind(-1)
    erased = eh * ew > 0
    assert erased.float().mean() > 0.9
    assert ((eh * ew / (32 * 40))[erased] <= 0.34).all() and (et + eh <= 32).all() and (el + ew <= 40).all()
    bits = params.views[3][0]["bits"]
    assert set(bits.unique().tolist()) == {3.0, 4.0, 5.0}
    hue = params.views[4][0]["hue_factor"]
    assert hue.abs().max() <= 0.25


def test_sample_uses_the_given_generator():
    tasks = mf.DistributionTasks(["rotate", "brightness"], seed=0)
    a = tasks.sample(8, generator=torch.Generator().manual_seed(11))
    b = tasks.sample(8, generator=torch.Generator().manual_seed(11))
    c = tasks.sample(8, generator=torch.Generator().manual_seed(12))
    assert torch.equal(a.views[0][0]["angle"], b.views[0][0]["angle"])
    assert not torch.equal(a.views[0][0]["angle"], c.views[0][0]["angle"])


def test_noise_task_statistics():
    x = torch.full((64, 3, 16, 16), 0.5)
    tasks = mf.DistributionTasks([("gaussian_noise", {"sigma": 0.05, "clip": False})], seed=0, backend="torch")
    params = tasks.sample(64, (16, 16))
    noise = tasks.apply(x, params)[0] - x
    assert abs(noise.mean().item()) < 2e-3
    assert abs(noise.std().item() - 0.05) < 2e-3
    assert torch.equal(tasks.apply(x, params), tasks.apply(x, params))


def test_channels_last_empty_batch_and_nan():
    x = photos(3)
    tasks = mf.DistributionTasks(["rotate", "brightness", "gaussian_blur"], seed=0, backend="torch")
    params = tasks.sample(3, (14, 19))
    assert torch.equal(tasks.apply(x, params), tasks.apply(x.contiguous(memory_format=torch.channels_last), params))
    empty = tasks(torch.zeros(0, 3, 14, 19, dtype=torch.uint8))
    assert empty.shape == (3, 0, 3, 14, 19)
    xf = TF.to_dtype(x, torch.float32, scale=True)
    xf[0, :, 5, 5] = float("nan")
    out = tasks.apply(xf, params)
    assert torch.isnan(out[1, 0, :, 5, 5]).all()  # brightness keeps NaN where it was
    assert not torch.isnan(out[:, 1:]).any()


def test_out_dtype_and_normalisation_fused():
    x = photos(2)
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    plain = mf.DistributionTasks(["rotate", "hue"], seed=0, backend="torch")
    fused = mf.DistributionTasks(["rotate", "hue"], seed=0, backend="torch", out_dtype=torch.bfloat16, mean=mean,
                                 std=std)
    params = plain.sample(2, (14, 19))
    want = TF.normalize(plain.apply(x, params).flatten(0, 1), mean, std).reshape(2, 2, 3, 14, 19)
    got = fused.apply(x, params)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want.to(torch.bfloat16))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(tasks=["rotate", "warp_speed"]), "warp_speed"),
        (dict(tasks=[("rotate", {"angel": 3})]), "angel"),
        (dict(tasks=[("hue", {"hue_factor": (-0.7, 0.1)})]), "hue_factor"),
        (dict(tasks=[("posterize", {"bits": (2.5, 4)})]), "bits"),
        (dict(tasks=[("gaussian_blur", {"kernel_size": 4})]), "kernel_size"),
        (dict(tasks=["rotate"], backend="cuda"), "backend"),
        (dict(tasks=["rotate"], out_dtype=torch.int32), "out_dtype"),
        (dict(tasks=["hue+rotate"], backend="triton"), "hue\\+rotate"),
        (dict(tasks=[]), "tasks"),
        (dict(tasks=["rotate"], mean=[0.5]), "std"),
    ],
)
def test_bad_construction_names_the_problem(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mf.DistributionTasks(**kwargs)


def test_bad_input_names_the_argument():
    tasks = mf.DistributionTasks(["rotate", "erase"], seed=0)
    with pytest.raises(ValueError, match="x must have shape"):
        tasks(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="C=2"):
        tasks(torch.rand(1, 2, 8, 8))
    with pytest.raises(ValueError, match="1.5"):
        tasks(torch.full((1, 3, 8, 8), 1.5))
    with pytest.raises(ValueError, match="image_size"):
        tasks.sample(4)
    params = tasks.sample(4, (8, 8))
    with pytest.raises(ValueError, match="batch_size=4"):
        tasks.apply(torch.rand(5, 3, 8, 8), params)
    with pytest.raises(ValueError, match="image_size"):
        tasks.apply(torch.rand(4, 3, 9, 8), params)
    other = mf.DistributionTasks(["rotate"], seed=0)
    with pytest.raises(ValueError, match="other tasks"):
        other.apply(torch.rand(4, 3, 8, 8), params)


def test_fusion_plan_folds_flips_into_one_warp():
    from mtdl_fast.kernels import fused_views as K

    tasks = mf.DistributionTasks(["horizontal_flip+vertical_flip", "identity", "gaussian_blur", "rotate+hue+contrast"])
    params = tasks.sample(2, (6, 9))
    spatial, codes, table = tasks.kernel_tables(params, torch.device("cpu"))
    assert spatial.tolist() == [K.SPATIAL_WARP, K.SPATIAL_NONE, K.SPATIAL_BLUR, K.SPATIAL_WARP]
    assert codes[3, :3].tolist() == [K.OP_HUE, K.OP_CONTRAST, K.OP_END]
    # both flips: source (x, y) -> (W-1-x, H-1-y)
    m = table[0, 0, K.SLOT_M0 : K.SLOT_M5 + 1].tolist()
    assert m == [-1.0, 0.0, 8.0, 0.0, -1.0, 5.0]
    assert math.isclose(table[3, 1, K.SLOT_HUE].item(), params.views[3][1]["hue_factor"][1].item(), rel_tol=1e-6)


FUSABLE = [name for name in ALL_OPS if name != "gaussian_noise"] + [
    "horizontal_flip+rotate+contrast+erase",
    "resized_crop+vertical_flip+posterize",
    "gaussian_blur+saturation+solarize",
    "sharpness+hue+grayscale",
    ("rotate+brightness", {"fill": 0.25}),
]


@pytest.mark.parametrize("channels, layout", [(3, "contiguous"), (1, "channels_last")])
def test_fused_kernel_equals_torch_path(device, channels, layout):
    """The Triton path (interpreter on CPU, native on GPU) against the torch path, same params."""
    x = photos(3, channels, height=11, width=13, seed=4).to(device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    torch_tasks = mf.DistributionTasks(FUSABLE, seed=2, backend="torch")
    triton_tasks = mf.DistributionTasks(FUSABLE, seed=2, backend="triton")
    params = torch_tasks.sample(3, (11, 13), device=device)
    want = torch_tasks.apply(x, params)
    got = triton_tasks.apply(x, params)
    for k, name in enumerate(torch_tasks.names):
        err = (got[k] - want[k]).abs().max().item()
        assert err <= 5e-5, (name, err)  # warps: coordinates rounded in another order (README)


def test_fused_kernel_noise_statistics_and_bf16_normalised_output(device):
    x = torch.full((16, 3, 12, 12), 0.5, device=device)
    tasks = mf.DistributionTasks(
        [("gaussian_noise", {"sigma": 0.05, "clip": False}), "hue"], seed=0, backend="triton",
        out_dtype=torch.bfloat16, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25],
    )
    out = tasks(x).float()
    noise = out[0] * 0.25  # undo the normalisation: (x + n - 0.5) / 0.25
    assert abs(noise.mean().item()) < 3e-3 and abs(noise.std().item() - 0.05) < 3e-3
    reference = mf.DistributionTasks(
        [("gaussian_noise", {"sigma": 0.05, "clip": False}), "hue"], seed=0, backend="torch",
        out_dtype=torch.bfloat16, mean=[0.5] * 3, std=[0.25] * 3,
    )
    params = tasks.sample(16, (12, 12), device=device)
    assert (tasks.apply(x, params)[1].float() - reference.apply(x, params)[1].float()).abs().max() <= 0.02


def test_state_dict_resumes_the_same_draws():
    x = photos(4)
    tasks = mf.DistributionTasks(["rotate", "gaussian_noise", "erase"], seed=9, backend="torch")
    tasks(x)
    saved = tasks.state_dict()
    expected = tasks(x)
    restored = mf.DistributionTasks(["rotate", "gaussian_noise", "erase"], seed=0, backend="torch")
    restored.load_state_dict(saved)
    assert torch.equal(restored(x), expected)


def test_every_backend_draws_the_same_parameters(device):
    """The parameter program runs as the Triton kernel (interpreter on the CPU) or as its torch twin:
    same seed, same stream, same parameters, on any device."""
    names = ["rotate+hue", "resized_crop+erase", "affine+posterize", "gaussian_blur+gaussian_noise"]
    twin = mf.DistributionTasks(names, seed=11, backend="torch").sample(6, (9, 12))
    kernel = mf.DistributionTasks(names, seed=11, backend="triton").sample(6, (9, 12), device=device)
    torch.testing.assert_close(kernel.values.cpu(), twin.values, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kernel.table.cpu(), twin.table, rtol=2e-7, atol=1e-6)
    assert torch.equal(kernel.views[1][0]["box"].cpu(), twin.views[1][0]["box"])


def test_views_are_copies_and_apply_reads_the_program_output():
    x = photos(3)
    tasks = mf.DistributionTasks(["rotate", "brightness"], seed=0, backend="torch")
    params = tasks.sample(3, (14, 19))
    before = tasks.apply(x, params)
    params.views[0][0]["angle"].add_(90.0)
    assert torch.equal(tasks.apply(x, params), before)
    assert params.views[0][0]["angle"].shape == (3,) and params.views[0][0]["angle"].dtype == torch.float64


def test_params_sampled_without_image_size_are_sized_at_apply(device):
    """Flips and rotations draw no size-dependent parameters; their warps are computed for the
    images' size when applied (the same draws again)."""
    x = photos(4, height=9, width=12).to(device)
    tasks = mf.DistributionTasks(["horizontal_flip+rotate", "hue"], seed=0, backend="triton")
    unsized = tasks.sample(4, generator=torch.Generator().manual_seed(5), device=device)
    sized = tasks.sample(4, (9, 12), generator=torch.Generator().manual_seed(5), device=device)
    assert unsized.image_size is None
    assert torch.equal(tasks.apply(x, unsized), tasks.apply(x, sized))
    with pytest.raises(ValueError, match="image_size"):
        tasks.kernel_tables(unsized, device)


def test_sampling_errors_name_the_argument():
    tasks = mf.DistributionTasks(["rotate"], seed=0)
    with pytest.raises(TypeError, match="batch_size"):
        tasks.sample(2.0)
    with pytest.raises(ValueError, match="batch_size must be >= 0, got -1"):
        tasks.sample(-1)
    with pytest.raises(TypeError, match="image_size"):
        tasks.sample(2, (8.0, 8))
    with pytest.raises(ValueError, match="image_size"):
        tasks.sample(2, (8, 8, 8))
    with pytest.raises(TypeError, match="generator"):
        tasks.sample(2, generator=3)
    with pytest.raises(TypeError, match="seed"):
        mf.DistributionTasks(["rotate"], seed=1.5)


def test_state_dict_of_the_older_format_still_loads():
    """Checkpoints written before the counter-based stream held per-device generator states."""
    tasks = mf.DistributionTasks(["rotate"], seed=0, backend="torch")
    tasks.set_extra_state({"seed": 4, "generators": {"cpu": torch.Generator().get_state()}, "calls": 2})
    fresh = mf.DistributionTasks(["rotate"], seed=4, backend="torch")
    fresh.sample(2), fresh.sample(2)
    assert torch.equal(tasks.sample(2).values, fresh.sample(2).values)


HAS_FUSED_CPU = importlib.util.find_spec("mtdl_fast.fused_cpu") is not None
requires_fused_cpu = pytest.mark.skipif(not HAS_FUSED_CPU, reason="mtdl_fast.fused_cpu (the fused C++ CPU "
                                        "kernel) is not in this tree yet")


def test_auto_picks_the_fused_cpu_kernel_when_it_imports():
    tasks = mf.DistributionTasks(["rotate", "hue"], seed=0)
    x = photos(2)
    assert tasks.resolve_backend(x) == ("cpu" if HAS_FUSED_CPU else "torch")
    assert tasks.resolve_backend(x.double() / 255) == "torch"  # float64 input: the torch path
    assert mf.DistributionTasks(["hue+rotate"]).resolve_backend(x) == "torch"  # does not fuse
    with pytest.raises(ValueError, match="hue\\+rotate"):
        mf.DistributionTasks(["hue+rotate"], backend="cpu")
    with pytest.raises(ValueError, match="float64"):
        mf.DistributionTasks(["rotate"], backend="cpu", out_dtype=torch.float64)


@requires_fused_cpu
@pytest.mark.parametrize("channels, layout", [(3, "contiguous"), (1, "channels_last")])
def test_fused_cpu_kernel_equals_torch_path(channels, layout):
    x = photos(3, channels, height=11, width=13, seed=4)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    torch_tasks = mf.DistributionTasks(FUSABLE, seed=2, backend="torch")
    cpu_tasks = mf.DistributionTasks(FUSABLE, seed=2, backend="cpu")
    params = torch_tasks.sample(3, (11, 13))
    want = torch_tasks.apply(x, params)
    got = cpu_tasks.apply(x, params)
    for k, name in enumerate(torch_tasks.names):
        err = (got[k] - want[k]).abs().max().item()
        assert err <= 5e-5, (name, err)
    assert cpu_tasks(x).shape == (len(FUSABLE), 3, channels, 11, 13)


@requires_fused_cpu
def test_fused_cpu_backend_refuses_other_devices():
    tasks = mf.DistributionTasks(["rotate"], backend="cpu")
    params = tasks.sample(2, (14, 19))
    with pytest.raises(ValueError, match="needs a CPU tensor, got x on meta"):
        tasks.apply(photos(2).to("meta"), params)


def test_params_apply_to_tasks_with_the_same_program_only():
    """Other ranges draw values that mean the same; another fill would make the fused table lie."""
    x = photos(2)
    params = mf.DistributionTasks([("rotate", {"angle": (0.0, 10.0)})], seed=0).sample(2, (14, 19))
    assert mf.DistributionTasks(["rotate"], backend="torch").apply(x, params).shape == (1, 2, 3, 14, 19)
    with pytest.raises(ValueError, match="other tasks"):
        mf.DistributionTasks([("rotate", {"fill": 0.5})]).apply(x, params)
