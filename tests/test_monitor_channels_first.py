"""Channels-first norms (timm's LayerNorm2d, ConvNeXt's LayerNorm): discovery of the normalized axis and statistics."""

import pytest
import torch
import torch.nn.functional as F

from normscope.audit import run_audit
from normscope.discovery import find_norm_layers, probe_norm_dims
from normscope.monitor import Monitor


class LayerNorm2d(torch.nn.LayerNorm):
    """As timm's ``LayerNorm2d``: an ``nn.LayerNorm`` over the channels of an NCHW input, by permuting around it."""

    def __init__(self, num_channels, eps=1e-6, affine=True):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine)

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtLayerNorm(torch.nn.Module):
    """As ConvNeXt's ``LayerNorm``: channels_last through F.layer_norm, channels_first by hand over dim 1."""

    def __init__(self, normalized_shape, eps=1e-6, data_format="channels_last"):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(normalized_shape))
        self.bias = torch.nn.Parameter(torch.zeros(normalized_shape))
        self.eps = eps
        self.data_format = data_format
        self.normalized_shape = (normalized_shape,)

    def forward(self, x):
        if self.data_format == "channels_last":
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class LayerNorm1d(torch.nn.LayerNorm):
    """An ``nn.LayerNorm`` over the channels of an (N, C, L) input, by transposing around it."""

    def forward(self, x):
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class RmsNorm2dLike(torch.nn.Module):
    """A bias-free RMSNorm over the channels of an (N, C, ...) input (duck-typed: weight + eps)."""

    def __init__(self, channels, eps=1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.linspace(0.5, 1.5, channels))
        self.eps = eps

    def forward(self, x):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + self.eps) * self.weight.view(shape)


class Net(torch.nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.norm = norm

    def forward(self, x):
        return self.norm(x)


def _nonunit_affine(norm):
    with torch.no_grad():
        if getattr(norm, "weight", None) is not None:
            norm.weight.copy_(torch.linspace(0.5, 1.5, norm.weight.numel()).view_as(norm.weight))
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_(torch.linspace(-0.2, 0.3, norm.bias.numel()).view_as(norm.bias))
    return norm


# --- discovery --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make, kind, dims", [
    (lambda: LayerNorm2d(8), "layer_norm", (1,)),
    (lambda: ConvNeXtLayerNorm(8, data_format="channels_first"), "layer_norm", (1,)),
    (lambda: ConvNeXtLayerNorm(8, data_format="channels_last"), "layer_norm", (-1,)),
    (lambda: LayerNorm1d(8), "layer_norm", (1,)),
    (lambda: RmsNorm2dLike(8), "rms_norm", (1,)),
    (lambda: torch.nn.LayerNorm(8), "layer_norm", (-1,)),
    (lambda: torch.nn.LayerNorm((4, 8)), "layer_norm", (-2, -1)),
    (lambda: torch.nn.RMSNorm(8), "rms_norm", (-1,)),
    (lambda: torch.nn.GroupNorm(2, 8), "group_norm", None),
    (lambda: torch.nn.BatchNorm2d(8), "batch_norm", None),
])
def test_norm_dims_found_from_what_the_module_computes(make, kind, dims):
    torch.manual_seed(0)
    (layer,) = find_norm_layers(Net(_nonunit_affine(make())))
    assert (layer.kind, layer.norm_dims) == (kind, dims)


def test_channels_first_found_whatever_the_channel_count():
    # C equal to the probe's spatial sizes must not confuse the probe (only one axis may have C entries)
    for c in (3, 5, 7):
        (layer,) = find_norm_layers(Net(LayerNorm2d(c)))
        assert layer.norm_dims == (1,)


def test_probe_norm_dims_reports_what_matched_and_why_not():
    kind, offset, dims, reason = probe_norm_dims(_nonunit_affine(LayerNorm2d(6)), 6, 1e-6)
    assert (kind, offset, dims, reason) == ("layer_norm", 0.0, (1,), "")
    kind, offset, dims, reason = probe_norm_dims(torch.nn.Identity(), 6, 1e-6)
    assert (kind, dims) == (None, None) and "do not match" in reason


def test_probe_true_keeps_a_channels_first_duck_norm_and_meta_is_never_run():
    (layer,) = find_norm_layers(Net(ConvNeXtLayerNorm(8, data_format="channels_first")), probe=True)
    assert (layer.kind, layer.norm_dims, layer.duck_typed) == ("layer_norm", (1,), True)
    with torch.device("meta"):
        model = Net(LayerNorm2d(8))
    (layer,) = find_norm_layers(model)
    assert layer.norm_dims is None  # unknown: not run on meta
    with torch.device("meta"):
        (layer,) = find_norm_layers(Net(torch.nn.LayerNorm(8)))
    assert layer.norm_dims == (-1,)  # torch's own forward: known without running it


# --- monitor statistics ---------------------------------------------------------------------------------------


def _per_position_channel_stats(x):
    """Float64 per-(sample, position) variance over the channels (axis 1): the rows a channels-first norm sees."""
    rows = x.double().movedim(1, -1).reshape(-1, x.shape[1])
    var = rows.var(-1, correction=0)
    return rows.shape[0], var, rows.mean(-1)


@pytest.mark.parametrize("cpu_kernel", [True, False])
@pytest.mark.parametrize("make, shape", [
    (lambda c: LayerNorm2d(c), (2, 8, 6, 5)),  # width != C: was skipped
    (lambda c: LayerNorm2d(c), (2, 8, 3, 8)),  # width == C: was taken along the width
    (lambda c: ConvNeXtLayerNorm(c, data_format="channels_first"), (2, 8, 6, 5)),
    (lambda c: ConvNeXtLayerNorm(c, data_format="channels_first"), (2, 8, 3, 8)),
    (lambda c: LayerNorm1d(c), (3, 8, 7)),  # N C L
    (lambda c: LayerNorm1d(c), (3, 8, 8)),
])
def test_channels_first_statistics_are_per_position_over_channels(make, shape, cpu_kernel):
    torch.manual_seed(0)
    model = Net(_nonunit_affine(make(shape[1])))
    x = torch.randn(*shape) * torch.linspace(0.5, 3.0, shape[-1]) + 0.3  # variance differs along the width
    with Monitor(model, every=1, flush_every=None, cpu_kernel=cpu_kernel) as mon:
        model(x)
        mon.step()
        (rec,) = [r for r in mon.flush() if r["type"] == "layer_stats"]
    n, var, mean = _per_position_channel_stats(x)
    assert rec["calls"] == 1 and rec["skipped_calls"] == 0
    assert rec["rows"] == n == rec["rows_sampled"]
    assert rec["var_mean"] == pytest.approx(float(var.mean()), rel=1e-5)
    assert rec["var_min"] == pytest.approx(float(var.min()), rel=1e-5)
    assert rec["var_max"] == pytest.approx(float(var.max()), rel=1e-5)
    assert rec["in_mean"] == pytest.approx(float(mean.mean()), rel=1e-5, abs=1e-7)
    assert rec["in_row_mean_max"] == pytest.approx(float(mean.max()), rel=1e-5)


@pytest.mark.parametrize("cpu_kernel", [True, False])
def test_channels_first_eps_dominated_rows_when_channels_are_constant_per_pixel(cpu_kernel):
    # Each pixel holds the same value in every channel (variance 0 over the channels) while the values vary a lot
    # along the width: every row the layer normalizes is eps-dominated; statistics along the width would say 3.
    model = Net(LayerNorm2d(8, eps=1e-6))
    x = (torch.randn(2, 1, 4, 8) * 2.0).expand(2, 8, 4, 8).contiguous()
    with Monitor(model, every=1, flush_every=None, cpu_kernel=cpu_kernel) as mon:
        model(x)
        mon.step()
        (rec,) = [r for r in mon.flush() if r["type"] == "layer_stats"]
        found = [f for f in mon.findings() if f.kind == "eps_dominated"]
    assert rec["var_max"] < 1e-10 and rec["eps_rows"] == rec["rows_sampled"] == 2 * 4 * 8
    assert [(f.layer, f.severity, f.value) for f in found] == [("norm", "warning", 64.0)]


def test_channels_first_rms_norm_statistics():
    torch.manual_seed(0)
    model = Net(RmsNorm2dLike(8))
    x = torch.randn(2, 8, 5, 6) + 0.7
    with Monitor(model, every=1, flush_every=None) as mon:
        model(x)
        mon.step()
        (rec,) = [r for r in mon.flush() if r["type"] == "layer_stats"]
    rows = x.double().movedim(1, -1).reshape(-1, 8)
    ms = rows.square().mean(-1)  # RMSNorm: the mean square is the statistic
    assert rec["kind"] == "rms_norm" and rec["rows"] == 60
    assert rec["var_mean"] == pytest.approx(float(ms.mean()), rel=1e-5)


@pytest.mark.parametrize("make, shape, rows", [
    (lambda: torch.nn.LayerNorm(8), (3, 5, 8), lambda x: x.double().reshape(-1, 8)),
    (lambda: torch.nn.GroupNorm(2, 8), (2, 8, 4, 3), lambda x: x.double().reshape(2 * 2, -1)),
    (lambda: torch.nn.BatchNorm2d(8), (2, 8, 4, 3), lambda x: x.double().transpose(0, 1).reshape(8, -1)),
])
def test_existing_kinds_unchanged(make, shape, rows):
    torch.manual_seed(0)
    model = Net(make())
    x = torch.randn(*shape) * torch.linspace(0.5, 2.0, shape[-1])
    with Monitor(model, every=1, flush_every=None) as mon:
        model(x)
        mon.step()
        (rec,) = [r for r in mon.flush() if r["type"] == "layer_stats"]
    r = rows(x)
    assert rec["rows"] == r.shape[0]
    assert rec["var_mean"] == pytest.approx(float(r.var(-1, correction=0).mean()), rel=1e-5)


# --- audit --------------------------------------------------------------------------------------------------------


class ConvNet(torch.nn.Module):
    """A ConvNeXt-like stem: conv, a timm-style LayerNorm2d and a ConvNeXt channels_first LayerNorm."""

    def __init__(self, c=8):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, c, 3, padding=1)
        self.norm1 = LayerNorm2d(c)
        self.conv2 = torch.nn.Conv2d(c, c, 1)
        self.norm2 = ConvNeXtLayerNorm(c, data_format="channels_first")
        self.head = torch.nn.Linear(c, 2)

    def forward(self, x):
        return self.head(self.norm2(self.conv2(self.norm1(self.conv(x)))).mean((2, 3)))


def test_audit_reports_channels_first_layers():
    torch.manual_seed(0)
    model = ConvNet()
    x = torch.randn(2, 3, 6, 5)  # width 5 != 8 channels
    with torch.no_grad():
        h = model.conv(x)
        inputs = {"norm1": h, "norm2": model.conv2(model.norm1(h))}
    res = run_audit(model, x, steps=("analysis", "monitor"))
    by_name = {layer["name"]: layer for layer in res["layers"]}
    assert set(by_name) == {"norm1", "norm2"}
    for name, inp in inputs.items():
        stats = by_name[name]["stats"]
        _, var, _ = _per_position_channel_stats(inp)
        assert stats["rows"] == 2 * 6 * 5 and stats["skipped_calls"] == 0
        assert stats["var_mean"] == pytest.approx(float(var.mean()), rel=1e-5)
        assert stats["var_p50"] == stats["var_p50"]  # not NaN


def test_discovery_probe_is_not_recorded_by_an_attached_monitor():
    model = Net(LayerNorm2d(8))
    with Monitor(model, every=1, flush_every=None) as mon:
        (layer,) = find_norm_layers(model)  # runs the probes on the module a monitor watches
        assert layer.norm_dims == (1,)
        assert mon.flush() == []  # nothing recorded
