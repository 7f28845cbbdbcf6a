"""Testing helpers for statelab and its plugins: the conformance kit and toy components."""

from statelab.testing.conformance import (
    assert_close,
    check_backbone,
    check_batch_independence,
    check_causality,
    check_chunked_forward,
    check_determinism,
    check_forward_then_step,
    check_gradients,
    check_injection,
    check_memory,
    check_model,
    check_shapes,
    check_state_roundtrip,
    check_stateful_module,
    state_roundtrip,
)

__all__ = [
    "assert_close",
    "check_backbone",
    "check_batch_independence",
    "check_causality",
    "check_chunked_forward",
    "check_determinism",
    "check_forward_then_step",
    "check_gradients",
    "check_injection",
    "check_memory",
    "check_model",
    "check_shapes",
    "check_state_roundtrip",
    "check_stateful_module",
    "state_roundtrip",
]
