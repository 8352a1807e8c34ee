"""The continual-alignment protocol's metrics and argument parsing (no model)."""

import pytest

from lifealign_lite.bench.continual import METHODS, BenchError, parse_methods, parse_task, transfer_metrics


def test_transfer_metrics_hand_computed():
    R0 = [0.5, 0.4, 0.3]
    R = [
        [0.8, 0.5, 0.35],
        [0.7, 0.9, 0.4],
        [0.6, 0.85, 0.95],
    ]
    m = transfer_metrics(R, R0)
    assert m["Last"] == pytest.approx((0.6 + 0.85 + 0.95) / 3)
    assert m["AP"] == pytest.approx((0.8 + (0.7 + 0.9) / 2 + (0.6 + 0.85 + 0.95) / 3) / 3)
    assert m["BWT"] == pytest.approx(((0.6 - 0.8) + (0.85 - 0.9)) / 2)
    assert m["FWT"] == pytest.approx(((0.5 - 0.4) + (0.4 - 0.3)) / 2)


def test_no_forgetting_gives_zero_bwt():
    R = [[0.7, 0.5], [0.7, 0.8]]
    assert transfer_metrics(R, [0.5, 0.5])["BWT"] == pytest.approx(0.0)


def test_incomplete_matrix_reports_last_only():
    R = [[None, None], [0.6, 0.7]]  # the multi-task upper bound has only its final row
    m = transfer_metrics(R, [0.5, 0.5])
    assert m["Last"] == pytest.approx(0.65)
    assert m["AP"] is None and m["BWT"] is None and m["FWT"] is None


def test_parse_task():
    t = parse_task("medical=data/a.jsonl:data/b.jsonl")
    assert (t.name, str(t.train), str(t.test)) == ("medical", "data/a.jsonl", "data/b.jsonl")
    for bad in ("medical", "medical=a.jsonl", "=a:b"):
        with pytest.raises((BenchError, ValueError)):
            parse_task(bad)
    with pytest.raises(ValueError):
        parse_task("../x=a.jsonl:b.jsonl")


def test_parse_methods():
    assert parse_methods("seq-dpo, lifealign") == ["seq-dpo", "lifealign"]
    with pytest.raises(BenchError, match="unknown method"):
        parse_methods("seq-dpo,magic")
    assert parse_methods("ewc,olora,mtl") == ["ewc", "olora", "mtl"]
    assert parse_methods("all") == list(METHODS) and {"ewc", "olora", "sep", "mtl"} <= set(parse_methods("all"))


def test_ewc_and_olora_are_sequential_dpo_plus_their_penalty():
    """Each baseline differs from seq-dpo by its own penalty only."""
    seq = METHODS["seq-dpo"][0]
    for name, key in (("ewc", "ewc_lambda"), ("olora", "olora_lambda")):
        overrides, memory, mode = METHODS[name]
        assert (memory, mode) == ("core", "stream") and overrides[key] > 0
        assert {k: v for k, v in overrides.items() if k != key} == seq


def test_ablation_methods_change_one_knob_at_a_time():
    """The paper's ablation: replay with FPO on/off and SLMC on/off."""
    def knobs(name):
        o = METHODS[name][0]
        return (o.get("loss"), o.get("tau", 0.9) < 1.0, o.get("replay_mix"))

    assert knobs("replay") == ("dpo", False, 0.2)
    assert knobs("replay-fpo") == ("fpo", False, 0.2)
    assert knobs("replay-slmc") == ("dpo", True, 0.2)
    assert knobs("lifealign") == ("fpo", True, 0.2)


def test_mtl_reports_its_average_as_ap_and_no_transfer():
    """mtl is scored once, after training on everything: AP is that average; BWT and FWT do not apply."""
    from lifealign_lite.bench.continual import summarize

    names = ["a", "b"]
    base = {n: {"pref_acc": 0.5, "lennorm_acc": 0.5, "margin": 0.0} for n in names}
    final = {"pref_acc": 0.8, "lennorm_acc": 0.6, "margin": 0.1}
    state = {"base": base, "scores": {"mtl": {"0,0": None, "1,0": final, "1,1": {**final, "pref_acc": 0.6}},
                                      "seq-dpo": {f"{i},{j}": final for i in range(2) for j in range(2)}}}
    res = summarize(state, names, ["mtl", "seq-dpo"])
    assert res["mtl"]["pref_acc"]["Last"] == res["mtl"]["pref_acc"]["AP"] == pytest.approx(0.7)
    assert res["mtl"]["pref_acc"]["BWT"] is None and res["mtl"]["pref_acc"]["FWT"] is None
    assert res["seq-dpo"]["pref_acc"]["AP"] == pytest.approx(0.8) and res["seq-dpo"]["pref_acc"]["BWT"] == 0.0


def test_presets_name_real_tasks_and_methods():
    from lifealign_lite.bench.continual import PRESETS

    for name, spec in PRESETS.items():
        tasks = [parse_task(t) for t in spec["tasks"]]
        assert parse_methods(spec["methods"]), name
        assert all(t.train.name == "train.jsonl" and t.test.name == "dev.jsonl" for t in tasks), name
    paper = PRESETS["paper4"]
    assert [parse_task(t).name for t in paper["tasks"]] == ["truthfulqa", "hh-harmless", "hh-helpful", "safe-rlhf"]
    assert {"seq-dpo", "mtl", "lifealign", "lifealign-bank"} <= set(parse_methods(paper["methods"]))
