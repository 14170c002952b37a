"""`observer: auto`: the histogram search or min to max for the whole model, chosen on held-out calibration batches
(quantcli.quantizers.range_choice, the ChosenRangeObserver of quantcli.quantizers.observers)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from quantcli import _torch, artifacts
from quantcli.quantizers import range_choice
from quantcli.quantizers.observers import ChosenRangeObserver, HistogramObserver
from tests.conftest import DIGITS, cli, digits_recipe
from tests.test_quantizer import leaves, prepare, section, sqnr_db

torch = _torch.torch


def test_the_observer_is_the_search_until_told_min_to_max_and_its_state_carries_which():
    from torchao.quantization.pt2e.observer import MinMaxObserver

    x = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    observers = {"auto": ChosenRangeObserver(), "histogram": HistogramObserver(), "minmax": MinMaxObserver()}
    for obs in observers.values():
        obs(x)
    qparams = {name: tuple(float(v) for v in obs.calculate_qparams()) for name, obs in observers.items()}
    assert qparams["auto"] == qparams["histogram"] != qparams["minmax"]
    observers["auto"].searched.fill_(False)
    assert tuple(float(v) for v in observers["auto"].calculate_qparams()) == qparams["minmax"]

    fresh = ChosenRangeObserver()  # another process's prepared module, loading the calibrated state strictly
    fresh.load_state_dict(observers["auto"].state_dict(), strict=True)
    assert tuple(float(v) for v in fresh.calculate_qparams()) == qparams["minmax"]
    older = ChosenRangeObserver()  # a state saved by the histogram observer, before the choice: the search
    older.load_state_dict(observers["histogram"].state_dict(), strict=True)
    assert tuple(float(v) for v in older.calculate_qparams()) == qparams["histogram"]


class ReadsTheSpikes(torch.nn.Module):
    """An identity conv, then only what exceeds 8: the output is the rare spikes the search clips away."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(4).reshape(4, 4, 1, 1))
            self.conv.bias.zero_()

    def forward(self, x):
        return torch.relu(self.conv(x) - 8.0).sum((2, 3))


class ReadsEverything(torch.nn.Module):
    """A conv whose every output reads the whole Gaussian bulk: the search's resolution pays."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.conv(x)


def batches(spikes: bool) -> list[torch.Tensor]:
    """4 batches of 8 Gaussian samples (4x96x96), with one value of 40 in each batch if `spikes`
    (3.4e-6 of the values: too rare for the search to keep)."""
    out = []
    for seed in range(4):
        x = torch.randn(8, 4, 96, 96, generator=torch.Generator().manual_seed(seed))
        if spikes:
            x.view(-1)[seed * 7919] = 40.0
        out.append(x)
    return out


@pytest.mark.parametrize(
    "model, spikes, rule", [(ReadsTheSpikes, True, "minmax"), (ReadsEverything, False, "histogram")]
)
def test_the_choice_is_the_rule_whose_converted_model_is_nearer_fp32_on_the_held_out_batches(model, spikes, rule):
    model, data = model().eval(), batches(spikes)
    prepared = prepare(model, {"x": data[0]}, section())
    state_before = copy.deepcopy(prepared.state_dict())
    session = range_choice.Session(prepared, correct=False)
    with torch.no_grad():
        for index, x in enumerate(data):
            session.forward(index, (x,))
    biases, choice = session.finish()
    assert biases == [] and choice["rule"] == rule and choice["held_out_samples"] == 24
    assert {bool(o.searched) for o in range_choice.chosen_range_observers(prepared)} == {rule == "histogram"}

    # each rule measured apart: the calibrated state with that rule, converted by convert_pt2e, on batches 1-3
    with torch.no_grad():
        reference = np.concatenate([leaves(model(x))[0] for x in data[1:]])
        for searched, name in range_choice.RULES.items():
            converted = copy.deepcopy(prepared)
            for obs in range_choice.chosen_range_observers(converted):
                obs.searched.fill_(searched)
            converted = _torch.convert(converted, fold_quantize=True)
            got = np.concatenate([leaves(converted(x))[0] for x in data[1:]])
            assert sqnr_db(reference, got) == pytest.approx(choice["sqnr_db"][name], abs=0.02)
    assert choice["sqnr_db"][rule] > choice["sqnr_db"][{"minmax": "histogram", "histogram": "minmax"}[rule]] + 1
    assert all(
        torch.equal(v, state_before[k]) for k, v in prepared.state_dict().items() if "activation_post_process" not in k
    )  # nothing but the observers changed (no bias correction here)


def test_the_held_out_batches_stop_at_the_sample_or_byte_limit_but_one_is_always_kept(monkeypatch):
    data = batches(False)  # 4 batches of 8: 3 after the first
    prepared = prepare(ReadsEverything().eval(), {"x": data[0]}, section())
    for samples, size, kept in ((64, 2**40, 3), (16, 2**40, 2), (64, 1, 1)):
        monkeypatch.setattr(range_choice, "HELD_OUT_SAMPLES", samples)
        monkeypatch.setattr(range_choice, "HELD_OUT_BYTES", size)
        session = range_choice.Session(prepared, correct=False)
        with torch.no_grad():
            for index, x in enumerate(data):
                session.forward(index, (x,))
        assert len(session.held) == kept
        assert all(torch.equal(args[0], x) for (args, _), x in zip(session.held, data[1:]))


def test_calibrate_records_the_choice_in_the_manifest_and_the_state_and_one_batch_keeps_the_search(copy_work, tmp_path):
    w = copy_work("prepared", "calibrated")
    manifest = json.loads((w / "calibrated" / artifacts.MANIFEST).read_text())
    ranges = manifest["ranges"]
    assert ranges["rule"] == max(ranges["sqnr_db"], key=ranges["sqnr_db"].get)
    assert 0 < ranges["held_out_samples"] <= range_choice.HELD_OUT_SAMPLES + manifest["samples"] // manifest["batches"]
    state = _torch.load_state(w / "calibrated" / artifacts.STATE)
    flags = {float(v) for k, v in state.items() if k.endswith(".searched")}
    assert flags == {float(ranges["rule"] == "histogram")}
    shown = cli("inspect", w / "calibrated")
    scores = ", ".join(f"{rule} {db} dB" for rule, db in ranges["sqnr_db"].items())
    line = f"  activation ranges: {ranges['rule']} (SQNR on {ranges['held_out_samples']} held-out samples: {scores})"
    assert shown.rc == 0 and line in shown.stdout.splitlines(), shown.stdout

    recipe = digits_recipe(tmp_path / "r", calibration={"data": str(DIGITS / "digits.npz"), "keys": {"x": "calib_x"}})
    run = cli("calibrate", w / "prepared", "-o", w / "one", "--recipe", recipe, "--batches", "1", "--json")
    assert run.rc == 0, run.stderr
    assert run.json()["manifest"]["ranges"] == {
        "rule": "histogram",
        "why": "one calibration batch: none held out to choose on",
    }
    state = _torch.load_state(w / "one" / artifacts.STATE)
    assert {bool(v) for k, v in state.items() if k.endswith(".searched")} == {True}
