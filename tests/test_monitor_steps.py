"""Monitor's trainer-facing API: caller-numbered steps, pausing, state_dict / load_state_dict, layer names."""

import math

import pytest
import torch

from normscope import Monitor


class Net(torch.nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.inp = torch.nn.Linear(4, d)
        self.ln = torch.nn.LayerNorm(d)
        self.out = torch.nn.Linear(d, 1)

    def forward(self, x):
        return self.out(self.ln(self.inp(x)))


def _train_step(model, nan=False):
    x = torch.randn(6, 4)
    if nan:
        x[2, 1] = math.nan
    model(x).square().mean().backward()
    model.zero_grad()


def _stats(mon):
    return [r for r in mon.records if r["type"] == "layer_stats"]


def test_caller_numbered_steps_in_records_findings_and_flushes():
    torch.manual_seed(0)
    model = Net()
    mon = Monitor(model, every=1, flush_every=10)
    for n in (0, 4, 8):  # the caller's step numbers, 4 apart
        _train_step(model, nan=n == 8)
        assert mon.current_step == n
        mon.step(step=n + 4)
    # Step 12 reached past the multiple 10 of flush_every: one flush, with the caller's numbers.
    (rec,) = _stats(mon)
    assert (rec["window_start"], rec["window_end"], rec["steps"], rec["calls"]) == (0, 8, 3, 3)
    assert [(f.kind, f.step) for f in mon.findings() if f.kind == "nonfinite_input"] == [("nonfinite_input", 8)]


def test_sampling_follows_the_callers_numbers():
    model = Net()
    mon = Monitor(model, every=3, flush_every=None)
    for n in (1, 2, 3, 5, 6):
        mon.step(step=n)
        _train_step(model)
    mon.step()
    (rec,) = _stats(mon) if mon.flush() else []
    assert (rec["window_start"], rec["window_end"], rec["steps"]) == (3, 6, 2)  # steps 3 and 6 only


@pytest.mark.parametrize("bad", [0, 2, -1, 3.0, True, "4"])
def test_step_rejects_numbers_not_after_the_current_one(bad):
    mon = Monitor(Net(), every=1)
    mon.step(step=2)
    with pytest.raises(ValueError, match=r"Expected step to be an int greater than the current step 2, but got"):
        mon.step(step=bad)
    assert mon.current_step == 2


def test_paused_records_nothing_and_does_not_advance():
    torch.manual_seed(0)
    model = Net()
    mon = Monitor(model, every=1, flush_every=None)
    _train_step(model)
    with mon.paused():
        assert mon.is_paused
        _train_step(model, nan=True)  # forward, input and parameter gradients all ignored
        with pytest.raises(RuntimeError, match="paused"):
            mon.step()
    assert not mon.is_paused and mon.current_step == 0
    mon.step()
    (rec,) = [r for r in mon.flush() if r["type"] == "layer_stats"]
    assert (rec["calls"], rec["grad_input_steps"], rec["grad_param_steps"], rec["nan_in"]) == (1, 1, 1, 0)
    assert mon.findings() == []


def test_pause_nests_and_resume_needs_a_pause():
    model = Net()
    mon = Monitor(model, every=1, flush_every=None)
    mon.pause()
    mon.pause()
    mon.resume()
    _train_step(model)  # still paused
    mon.resume()
    _train_step(model)
    mon.step()
    assert [r["calls"] for r in _stats(mon) or [r for r in mon.flush() if r["type"] == "layer_stats"]] == [1]
    with pytest.raises(RuntimeError, match="Expected a paused Monitor"):
        mon.resume()


def test_state_dict_round_trip_continues_numbering_findings_and_drift(tmp_path):
    torch.manual_seed(0)
    model = Net()
    init = model.ln.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    mon = Monitor(model, every=1, flush_every=None)
    for _ in range(3):
        model(torch.randn(6, 4)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        mon.step()
    _train_step(model, nan=True)
    mon.step()
    before = [(f.kind, f.step) for f in mon.findings()]
    assert ("nonfinite_input", 3) in before
    torch.save(mon.state_dict(), tmp_path / "mon.pt")
    mon.close()

    mon2 = Monitor(model, every=1, flush_every=None)  # references taken now: would measure no drift
    mon2.load_state_dict(torch.load(tmp_path / "mon.pt", weights_only=True))
    assert mon2.current_step == 4
    _train_step(model, nan=True)  # the same condition: not reported a second time
    mon2.step()
    (rec,) = [r for r in mon2.flush() if r["type"] == "layer_stats"]
    assert (rec["window_start"], rec["window_end"]) == (4, 4)
    expected = torch.linalg.vector_norm(model.ln.weight.detach() - init).item()
    assert expected > 0 and rec["weight_drift_l2"] == pytest.approx(expected, rel=1e-6)
    assert [(f.kind, f.step) for f in mon2.findings()] == before


def test_load_state_dict_validates():
    model = Net()
    state = Monitor(model).state_dict()
    mon = Monitor(model, every=1, flush_every=None)
    with pytest.raises(ValueError, match="Expected a Monitor.state_dict"):
        mon.load_state_dict({"step": 3})
    with pytest.raises(ValueError, match="same layers"):
        mon.load_state_dict({**state, "layers": ["other"]})
    _train_step(model)
    with pytest.raises(RuntimeError, match="before anything is recorded"):
        mon.load_state_dict(state)
    mon.step()
    mon.flush()
    mon.load_state_dict({**state, "step": 7})
    assert mon.current_step == 7


def test_wrapper_components_and_prefix_are_stripped_from_names():
    inner = Net()
    holder = torch.nn.Module()
    wrapper = torch.nn.Module()
    wrapper.add_module("_checkpoint_wrapped_module", inner)
    holder.add_module("model", wrapper)
    holder.add_module("ln", torch.nn.LayerNorm(8))
    assert [x.name for x in Monitor(holder).layers] == ["model.ln", "ln"]
    assert [x.name for x in Monitor(holder, strip_wrappers=False).layers] == [
        "model._checkpoint_wrapped_module.ln", "ln"]
    assert [x.name for x in Monitor(torch.nn.DataParallel(inner)).layers] == ["ln"]
    with pytest.raises(ValueError, match="Expected distinct layer names after renaming"):
        Monitor(holder, strip_prefix="model")
    with pytest.raises(ValueError, match="strip_prefix"):
        Monitor(holder, strip_prefix=".")
    del holder.ln
    mon = Monitor(holder, strip_prefix="model", every=1)
    assert [x.name for x in mon.layers] == ["ln"]
    inner(torch.randn(2, 4))
    assert [r["layer"] for r in mon.flush() if r["type"] == "layer_stats"] == ["ln"]
