"""The stack-noise tool's arithmetic (ops/lab/stack_noise.py), on the CPU: CPU spent between two
readings, largest first, new threads counted from zero and idle ones left out; the per-request GPU
summary ORs every clock-event reason it saw."""

from ops.lab.stack_noise import GpuClocks, spent


def test_spent_is_the_largest_deltas_first_new_ones_from_zero_idle_ones_left_out():
    before = {1: ("engine", 10.0), 2: ("loop", 1.0), 3: ("idle", 5.0)}
    after = {1: ("engine", 13.5), 2: ("loop", 1.2), 3: ("idle", 5.001), 4: ("new", 0.4)}
    assert spent(before, after, top=5) == [[3.5, "engine", 1], [0.4, "new", 4], [0.2, "loop", 2]]
    assert spent(before, after, top=1) == [[3.5, "engine", 1]]


def test_gpu_summary_means_and_ors_the_reasons():
    clocks = GpuClocks.__new__(GpuClocks)  # no NVML thread: only the summary is under test
    clocks.rows = [(1800, 500.0, 0x4), (1900, 600.0, 0x1), (2000, 700.0, -1)]
    assert clocks.take() == {"sm_mhz": 1900, "watts": 600, "reasons": "0x5"}
    assert clocks.take() == {}  # taken: the next request starts empty
