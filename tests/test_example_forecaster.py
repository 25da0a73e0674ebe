"""examples/ln_lstm_forecaster.py runs (small settings) and shows what it claims: the LN-LSTM trains under the
Monitor, and at initialisation its gradient reaches the start of the window where torch.nn.LSTM's vanishes."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ln_lstm_forecaster.py"


def _load():
    spec = importlib.util.spec_from_file_location("ln_lstm_forecaster", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_forecaster_example(tmp_path, capsys):
    mod = _load()
    jsonl = tmp_path / "monitor.jsonl"
    result = mod.main(["--steps", "30", "--window", "16", "--hidden", "8", "--batch", "8", "--out", "",
                       "--jsonl", str(jsonl)])
    out = capsys.readouterr().out
    assert "||dL/dx_t||" in out and "Monitor findings on the LN-LSTM: 0" in out
    ln, plain = result["LN-LSTM"], result["LSTM"]
    for r in (ln, plain):
        assert len(r["grad_before"]) == len(r["grad_after"]) == 16
        assert all(math.isfinite(v) and v > 0 for v in r["grad_before"] + r["grad_after"])
        assert len(r["losses"]) == 30 and math.isfinite(r["test_mse"])
    assert sum(ln["losses"][-5:]) < sum(ln["losses"][:5])  # it learns
    reach_ln = ln["grad_before"][0] / ln["grad_before"][-1]
    reach_plain = plain["grad_before"][0] / plain["grad_before"][-1]
    assert reach_ln > 100 * reach_plain  # the vanishing-gradient picture of the plot
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    layers = {r["layer"] for r in records if r.get("type") == "layer_stats"}
    assert {"rnn.ln_ih_l0", "rnn.ln_hh_l1", "rnn.ln_c_l1"} <= layers
    hh = [r for r in records if r.get("layer") == "rnn.ln_hh_l0"]
    assert hh and all(r["calls"] % 15 == 0 for r in hh)  # once per time step after the first, per sampled step
