from __future__ import annotations

from local_inference_pool.core.circuit import Circuit, CircuitState


def test_opens_after_threshold_consecutive_failures_only() -> None:
    circuit = Circuit(threshold=3, cooldown=10)
    assert not circuit.record_failure(0)
    assert not circuit.record_failure(0)
    circuit.record_success()  # a success in between resets the count
    assert not circuit.record_failure(0)
    assert not circuit.record_failure(0)
    assert circuit.record_failure(0)
    assert circuit.current(5) is CircuitState.OPEN


def test_half_open_after_cooldown_then_closed_by_a_good_trial() -> None:
    circuit = Circuit(threshold=1, cooldown=10)
    circuit.record_failure(100)
    assert circuit.current(109.9) is CircuitState.OPEN
    assert circuit.current(110) is CircuitState.HALF_OPEN
    assert circuit.record_success()
    assert circuit.current(110) is CircuitState.CLOSED
    assert circuit.openings == 1


def test_failed_trial_reopens_with_a_doubled_cooldown_up_to_the_cap() -> None:
    circuit = Circuit(threshold=1, cooldown=10, max_cooldown=25)
    circuit.record_failure(0)
    cooldowns = []
    now = 0.0
    for _ in range(3):
        now = circuit.open_until
        assert circuit.current(now) is CircuitState.HALF_OPEN
        assert circuit.record_failure(now)
        cooldowns.append(circuit.open_until - now)
    assert cooldowns == [20, 25, 25]
    assert circuit.openings == 4
