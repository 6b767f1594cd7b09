"""Specification of the network building blocks in ``models/`` (CPU only, small inputs).

The networks must stay state-dict compatible with junyanz/pytorch-CycleGAN-and-pix2pix:
the parameter counts and key names below are derived from upstream's layer layout.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist
from torch import nn

from models.discriminators import DISCRIMINATORS
from models.generators import (
    GENERATORS,
    ResnetGenerator,
    UnetGenerator,
    required_divisor,
)
from models.networks import (
    GAN_MODES,
    INIT_TYPES,
    LR_POLICIES,
    NORM_HELP,
    NORM_LAYERS,
    GANLoss,
    cal_gradient_penalty,
    define_D,
    define_G,
    get_norm_layer,
    get_scheduler,
    init_net,
    init_weights,
)

RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def smallest_size(netG: str) -> int:
    # A ResNet generator's 4x downsampled bottleneck must be at least 2x2: its blocks
    # reflection-pad by 1, which a 1x1 map cannot do. A U-Net goes down to 1x1.
    return max(required_divisor(netG), 8)


# --- generators -----------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["instance", "batch"])
@pytest.mark.parametrize("netG", sorted(GENERATORS))
def test_generator_keeps_shape_and_tanh_range(netG: str, norm: str) -> None:
    size = smallest_size(netG)
    net = define_G(1, 1, ngf=8, netG=netG, norm=norm)
    x = torch.randn(1, 1, size, size) * 3
    with torch.no_grad():
        y = net(x)
    assert y.shape == (1, 1, size, size)
    assert torch.isfinite(y).all()
    assert y.min() >= -1
    assert y.max() <= 1


def test_required_divisor_is_the_downsampling_factor() -> None:
    assert required_divisor("unet_128") == 128
    assert required_divisor("unet_256") == 256
    assert required_divisor("unet_512") == 512  # a 256x256 slice cannot use unet_512
    assert required_divisor("resnet_6blocks") == 4
    assert required_divisor("resnet_9blocks") == 4
    with pytest.raises(ValueError, match="unet_256"):
        required_divisor("unet256")


def test_generator_channels_follow_input_and_output_nc() -> None:
    net = define_G(3, 2, ngf=8, netG="unet_128", norm="instance")
    with torch.no_grad():
        assert net(torch.zeros(2, 3, 128, 128)).shape == (2, 2, 128, 128)


# Upstream's counts, by layer, for ngf = ndf = 64 and batch norm (no conv bias before a
# batch norm; the U-Net's first conv has none either, its last ConvTranspose2d has one):
#   unet_256 3->3: outermost 3*64*16 + (128*3*16 + 3) = 9,219
#     + ngf->2ngf level 393,600 + 2ngf->4ngf 1,573,632 + 4ngf->8ngf 6,292,992
#     + 3 middle 8ngf levels 3 * 12,584,960 + innermost 8,389,632        = 54,413,955
#   basic D, 6 input channels: 6,208 + 131,328 + 524,800 + 2,098,176 + 8,193 = 2,768,705
# Upstream prints these as "54.414 M" and "2.769 M".
@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (lambda: define_G(3, 3, 64, "unet_256", norm="batch"), 54_413_955),
        (lambda: define_G(3, 3, 64, "resnet_9blocks", norm="batch"), 11_383_427),
        (lambda: define_G(3, 3, 64, "resnet_9blocks", norm="instance"), 11_378_179),
        (lambda: define_D(6, 64, "basic", norm="batch"), 2_768_705),
    ],
    ids=["unet_256-batch", "resnet_9blocks-batch", "resnet_9blocks-instance", "basic-D-batch"],
)
def test_parameter_counts_match_upstream(build, expected: int) -> None:
    assert n_params(build()) == expected


def test_unet_256_state_dict_keys_match_upstream() -> None:
    keys = set(define_G(3, 3, 8, "unet_256", norm="batch").state_dict())
    # Outermost block: [downconv, submodule, ReLU, upconv, Tanh]; middle blocks:
    # [LeakyReLU, downconv, downnorm, submodule, ReLU, upconv, upnorm]; innermost:
    # [LeakyReLU, downconv, ReLU, upconv, upnorm]. unet_256 has 6 middle blocks, so the
    # innermost sits at outermost.1 followed by 6 hops through index 3.
    innermost = "model.model.1" + ".model.3" * 6
    expected = {
        "model.model.0.weight",
        "model.model.3.weight",
        "model.model.3.bias",
        "model.model.1.model.1.weight",
        "model.model.1.model.2.weight",
        "model.model.1.model.2.running_mean",
        "model.model.1.model.5.weight",
        "model.model.1.model.6.running_var",
        f"{innermost}.model.1.weight",
        f"{innermost}.model.3.weight",
        f"{innermost}.model.4.running_mean",
    }
    assert expected <= keys
    # Convs followed by batch norm carry no bias, as upstream.
    assert "model.model.0.bias" not in keys
    assert "model.model.1.model.1.bias" not in keys
    assert f"{innermost}.model.3.model.1.weight" not in keys  # nothing inside the innermost


def test_resnet_9blocks_state_dict_keys_match_upstream() -> None:
    keys = set(define_G(3, 3, 8, "resnet_9blocks", norm="batch").state_dict())
    # 0 pad, 1 conv, 2 norm, 3 ReLU, 4-9 two downsamplings, 10-18 blocks,
    # 19-24 two upsamplings, 25 pad, 26 conv, 27 Tanh.
    expected = {
        "model.1.weight",
        "model.2.running_mean",
        "model.4.weight",
        "model.7.weight",
        "model.10.conv_block.1.weight",
        "model.10.conv_block.2.running_var",
        "model.10.conv_block.5.weight",
        "model.18.conv_block.6.weight",
        "model.19.weight",
        "model.22.weight",
        "model.23.bias",
        "model.26.weight",
        "model.26.bias",
    }
    assert expected <= keys
    assert not any(k.startswith(("model.19.conv_block", "model.27")) for k in keys)
    assert "model.1.bias" not in keys


def test_basic_discriminator_state_dict_keys_match_upstream() -> None:
    keys = list(define_D(6, 8, "basic", norm="batch").state_dict())
    convs = ["model.0.weight", "model.0.bias", "model.2.weight", "model.5.weight"]
    convs += ["model.8.weight", "model.11.weight", "model.11.bias"]
    assert set(convs) <= set(keys)
    assert {f"model.{i}.{s}" for i in (3, 6, 9) for s in RUNNING_STATS} <= set(keys)
    assert "model.2.bias" not in keys


def test_pixel_discriminator_keeps_upstream_attribute_name() -> None:
    keys = set(define_D(2, 8, "pixel", norm="batch").state_dict())
    assert {"net.0.weight", "net.2.weight", "net.3.running_var", "net.5.weight"} <= keys


# --- normalisation --------------------------------------------------------------------


@pytest.mark.parametrize("netG", sorted(GENERATORS))
def test_instance_norm_has_no_running_stats_and_biased_convs(netG: str) -> None:
    keys = set(define_G(1, 1, 8, netG, norm="instance").state_dict())
    assert not any(k.endswith(RUNNING_STATS) for k in keys)
    bias = "model.model.1.model.1.bias" if netG.startswith("unet") else "model.1.bias"
    assert bias in keys


@pytest.mark.parametrize(
    ("alias", "same_as"), [("sync_instance", "instance"), ("syncbatch", "batch")]
)
@pytest.mark.parametrize("netG", ["unet_128", "resnet_6blocks"])
def test_sync_norms_have_the_keys_of_their_plain_norm(netG: str, alias: str, same_as: str) -> None:
    a = define_G(1, 1, 8, netG, norm=alias).state_dict()
    b = define_G(1, 1, 8, netG, norm=same_as).state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


def test_sync_instance_builds_exactly_instance_layers() -> None:
    assert get_norm_layer("sync_instance") == get_norm_layer("instance")
    layer = get_norm_layer("sync_instance")(4)
    assert isinstance(layer, nn.InstanceNorm2d)
    assert not layer.affine
    assert not layer.track_running_stats
    assert "sync_instance (identical to instance" in NORM_HELP


def test_syncbatch_runs_forward_and_backward_on_cpu_in_train_mode() -> None:
    netG = define_G(1, 1, 8, "unet_128", norm="syncbatch").train()
    netD = define_D(2, 8, "basic", norm="syncbatch").train()
    x = torch.randn(2, 1, 128, 128)
    y = netG(x)
    netD(torch.cat([x, y], 1)).mean().backward()
    assert isinstance(get_norm_layer("syncbatch")(4), nn.BatchNorm2d)


def test_syncbatch_becomes_sync_batchnorm_under_torch_distributed(tmp_path) -> None:
    if not dist.is_available():
        pytest.skip("torch.distributed not built")
    # A one-process gloo group is enough to switch the conversion on.
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    try:
        synced = define_G(1, 1, 8, "unet_128", norm="syncbatch")
    finally:
        dist.destroy_process_group()
    plain = define_G(1, 1, 8, "unet_128", norm="batch")
    assert any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())
    assert list(synced.state_dict()) == list(plain.state_dict())


def test_norm_layers_per_name() -> None:
    assert set(NORM_LAYERS) == {"batch", "syncbatch", "instance", "sync_instance", "none"}
    batch = get_norm_layer("batch")(4)
    assert isinstance(batch, nn.BatchNorm2d)
    assert batch.affine
    assert batch.track_running_stats
    assert isinstance(get_norm_layer("none")(4), nn.Identity)
    for name in NORM_LAYERS:
        assert name in NORM_HELP


def test_no_norm_generator_runs_and_has_no_norm_parameters() -> None:
    net = define_G(1, 1, 8, "unet_128", norm="none")
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) for m in net.modules())
    with torch.no_grad():
        assert net(torch.randn(1, 1, 128, 128)).shape == (1, 1, 128, 128)


# --- discriminators -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("netD", "n_layers_D", "patches"),
    [
        # 256 -> 128 -> 64 -> 32 (stride 2) -> 31 -> 30 (stride 1): 70x70 receptive field.
        ("basic", 3, 30),
        ("n_layers", 3, 30),
        ("basic", 5, 30),  # basic ignores n_layers_D
        ("n_layers", 4, 14),  # 256 -> 16 -> 15 -> 14
        ("pixel", 3, 256),
    ],
)
def test_discriminator_output_shape(netD: str, n_layers_D: int, patches: int) -> None:
    net = define_D(2, 8, netD, n_layers_D=n_layers_D, norm="instance")
    with torch.no_grad():
        out = net(torch.randn(1, 2, 256, 256))
    assert out.shape == (1, 1, patches, patches)


def test_every_discriminator_is_covered() -> None:
    assert set(DISCRIMINATORS) == {"basic", "n_layers", "pixel"}


# --- losses ---------------------------------------------------------------------------


@pytest.mark.parametrize("gan_mode", GAN_MODES)
@pytest.mark.parametrize("target_is_real", [True, False])
def test_gan_loss_is_a_finite_scalar(gan_mode: str, target_is_real: bool) -> None:
    loss = GANLoss(gan_mode)(torch.randn(2, 1, 30, 30), target_is_real)
    assert loss.shape == ()
    assert torch.isfinite(loss)


def test_vanilla_loss_reads_logits() -> None:
    loss = GANLoss("vanilla")
    confident_real = torch.full((1, 1, 30, 30), 10.0)
    assert loss(confident_real, True) < 1e-3
    assert loss(-confident_real, False) < 1e-3
    assert loss(confident_real, False) > 5


def test_lsgan_loss_is_squared_distance_to_label() -> None:
    loss = GANLoss("lsgan")
    assert loss(torch.ones(1, 1, 4, 4), True) == 0
    assert loss(torch.full((1, 1, 4, 4), 0.5), False) == pytest.approx(0.25)


def test_wgangp_loss_sign_convention() -> None:
    prediction = torch.randn(2, 1, 30, 30)
    loss = GANLoss("wgangp")
    # Minimising pushes the critic's score of real samples up and of fakes down.
    assert loss(prediction, True) == pytest.approx(-prediction.mean().item())
    assert loss(prediction, False) == pytest.approx(prediction.mean().item())


def test_gan_loss_labels_are_buffers_that_move_with_the_module() -> None:
    loss = GANLoss("lsgan", target_real_label=0.9, target_fake_label=0.1)
    assert {name for name, _ in loss.named_buffers()} == {"real_label", "fake_label"}
    assert loss(torch.full((1, 1, 2, 2), 0.9), True) == pytest.approx(0.0)
    assert loss(torch.full((1, 1, 2, 2), 0.1), False) == pytest.approx(0.0)


@pytest.mark.parametrize("point", ["mixed", "real", "fake"])
def test_gradient_penalty_is_finite_positive_and_trains_the_critic(point: str) -> None:
    torch.manual_seed(0)
    netD = define_D(2, 8, "basic", norm="instance")
    real, fake = torch.randn(2, 2, 64, 64), torch.randn(2, 2, 64, 64)
    penalty, gradients = cal_gradient_penalty(netD, real, fake, "cpu", type=point)
    assert torch.isfinite(penalty)
    assert penalty > 0
    assert gradients.shape == (2, 2 * 64 * 64)
    penalty.backward()
    assert netD.model[0].weight.grad is not None
    assert not real.requires_grad  # the caller's tensors are left alone


def test_gradient_penalty_off_when_lambda_is_zero() -> None:
    netD = define_D(2, 8, "pixel")
    x = torch.randn(1, 2, 8, 8)
    assert cal_gradient_penalty(netD, x, x, "cpu", lambda_gp=0.0) == (0.0, None)


# --- initialisation and placement ------------------------------------------------------


@pytest.mark.parametrize("init_type", sorted(INIT_TYPES))
def test_every_init_type_runs_and_zeroes_biases(init_type: str) -> None:
    net = define_D(2, 8, "basic", norm="batch", init_type=init_type, init_gain=0.02)
    assert torch.count_nonzero(net.model[0].bias) == 0
    assert torch.isfinite(net.model[0].weight).all()


def test_normal_init_statistics() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(64, 64, 3), nn.BatchNorm2d(4096))
    init_weights(net, "normal", init_gain=0.02)
    assert net[0].weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert net[1].weight.mean().item() == pytest.approx(1.0, abs=0.005)  # N(1, gain)
    assert net[1].weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.count_nonzero(net[1].bias) == 0


def test_init_net_returns_the_bare_network() -> None:
    # No DataParallel wrapper: keys have no "module." prefix.
    net = init_net(UnetGenerator(1, 1, 7, ngf=8), gpu_ids=[])
    assert isinstance(net, UnetGenerator)
    assert not any(k.startswith("module.") for k in net.state_dict())


def test_reference_export_snippet_round_trips_a_saved_generator(tmp_path) -> None:
    saved = define_G(1, 1, 64, "unet_512", norm="instance", gpu_ids=[])
    path = tmp_path / "latest_net_G.pth"
    torch.save(saved.state_dict(), path)

    # As in our users' documentation (with gpu_ids=[] for the CPU):
    generator = define_G(input_nc=1, output_nc=1, ngf=64, netG="unet_512", norm="instance",
                         use_dropout=False, init_gain=0.02, gpu_ids=[])  # fmt: skip
    generator.load_state_dict(torch.load(path))
    generator.eval()

    loaded = generator.state_dict()
    assert loaded.keys() == saved.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in saved.state_dict().items())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_gpu_ids_without_cuda_fail_with_advice() -> None:
    with pytest.raises(RuntimeError, match=r"CUDA is not available.*--gpu_ids -1"):
        define_G(1, 1, 8, "unet_128", norm="instance", gpu_ids=[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_ids_place_the_network_on_that_gpu() -> None:
    net = define_G(1, 1, 8, "unet_128", norm="instance", gpu_ids=[0])
    assert next(net.parameters()).device == torch.device("cuda", 0)


# --- learning-rate schedules -----------------------------------------------------------


def lr_per_epoch(lr_policy: str, epochs: int, metric: float | None = None, **periods) -> list:
    """The lr in effect during each of ``epochs`` epochs, starting from lr = 1."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    settings = {"epoch_count": 1, "n_epochs": 3, "n_epochs_decay": 4, "lr_decay_iters": 2}
    scheduler = get_scheduler(optimizer, lr_policy, **{**settings, **periods})
    lrs = []
    for _ in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step() if metric is None else scheduler.step(metric)
    return lrs


def test_linear_policy_holds_then_decays_towards_zero() -> None:
    # n_epochs=3 at lr, then n_epochs_decay=4 epochs down in steps of 1/(4+1).
    assert lr_per_epoch("linear", 7) == pytest.approx([1, 1, 1, 0.8, 0.6, 0.4, 0.2])


def test_linear_policy_resumes_on_the_same_curve() -> None:
    # --epoch_count 5 continues where epoch 5 of a new run would be.
    assert lr_per_epoch("linear", 3, epoch_count=5) == pytest.approx([0.6, 0.4, 0.2])


def test_step_policy_drops_tenfold_every_lr_decay_iters() -> None:
    assert lr_per_epoch("step", 5, lr_decay_iters=2) == pytest.approx([1, 1, 0.1, 0.1, 0.01])


def test_plateau_policy_cuts_lr_by_five_after_patience() -> None:
    # A flat metric: first epoch sets the best, 5 more are tolerated, the 6th cuts.
    lrs = lr_per_epoch("plateau", 9, metric=1.0)
    assert lrs[:7] == pytest.approx([1.0] * 7)
    assert lrs[7] == pytest.approx(0.2)


def test_cosine_policy_reaches_zero_after_n_epochs() -> None:
    lrs = lr_per_epoch("cosine", 5, n_epochs=4)
    assert lrs[:3] == pytest.approx([1.0, 0.8535534, 0.5])
    assert lrs[4] == pytest.approx(0.0, abs=1e-12)


def test_lr_policies_are_the_documented_ones() -> None:
    assert set(LR_POLICIES) == {"linear", "step", "plateau", "cosine"}


# --- unknown names ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "closest"),
    [
        (functools.partial(define_G, 1, 1, 8, "unet512"), "unet_512"),
        (functools.partial(define_G, 1, 1, 8, "resnet_9block"), "resnet_9blocks"),
        (functools.partial(define_D, 2, 8, "basci"), "basic"),
        (functools.partial(define_G, 1, 1, 8, "unet_128", norm="instanse"), "instance"),
        (functools.partial(define_G, 1, 1, 8, "unet_128", init_type="xavir"), "xavier"),
        (functools.partial(GANLoss, "lsgann"), "lsgan"),
        (functools.partial(lr_per_epoch, "lineer", 1), "linear"),
        (functools.partial(ResnetGenerator, 1, 1, 8, padding_type="reflection"), "reflect"),
    ],
)
def test_unknown_names_list_valid_names_and_closest(call, closest: str) -> None:
    with pytest.raises(ValueError, match="choose one of ") as excinfo:
        call()
    assert f"did you mean {closest!r}" in str(excinfo.value)


@pytest.mark.parametrize("netG", ["unet_128", "resnet_6blocks"])
def test_residual_generator_starts_from_its_input_and_keeps_upstream_keys(netG):
    plain = define_G(3, 1, 4, netG, "instance", gpu_ids=[])
    residual = define_G(3, 1, 4, netG, "instance", gpu_ids=[], residual=True)
    assert plain.state_dict().keys() == residual.state_dict().keys()
    # Untrained, it changes nothing: the output is the centre slice of the input.
    x = torch.rand(2, 3, 128, 128) * 1.8 - 0.9
    with torch.no_grad():
        assert torch.allclose(residual(x), x[:, 1:2], atol=1e-6)
        residual.load_state_dict(plain.state_dict())
        assert torch.allclose(residual(x), torch.clamp(x[:, 1:2] + plain(x), -1, 1), atol=1e-6)
