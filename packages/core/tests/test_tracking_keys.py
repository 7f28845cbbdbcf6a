from statelab.tracking import mlflow_key


def test_metric_names_mlflow_refuses_are_rewritten_not_dropped():
    assert mlflow_key("probe/passkey/acc@512@0.25") == "probe/passkey/acc_512_0.25"
    assert mlflow_key("reg/0.toy-gate-l2.gate_mean") == "reg/0.toy-gate-l2.gate_mean"
    assert mlflow_key("probe.causality.verdict") == "probe.causality.verdict"
    assert mlflow_key("a b:c/d") == "a b:c/d"
