"""The per-shape latency profile times cold weights, as a model's call reads them."""

from torch import nn

from worker.engine.kernels.profile import COLD_BYTES_CAP, in_turn, copies_for


def test_a_shape_is_timed_over_copies_as_large_as_the_models_weights():
    assert copies_for(weight_bytes=1_000, working_set_bytes=10_500) == 11
    assert copies_for(weight_bytes=1_000, working_set_bytes=500) == 1  # never fewer than the layer itself
    assert copies_for(weight_bytes=2**20, working_set_bytes=10 * COLD_BYTES_CAP) == COLD_BYTES_CAP // 2**20


def test_consecutive_calls_read_different_weights_and_every_copy_is_used():
    seen = []

    class Recorder(nn.Module):
        def forward(self, x):
            seen.append(id(self))
            return x

    copies = [Recorder() for _ in range(3)]
    call = in_turn(copies)
    for _ in range(7):
        call(None)
    assert all(a != b for a, b in zip(seen, seen[1:]))
    assert set(seen) == {id(m) for m in copies}
