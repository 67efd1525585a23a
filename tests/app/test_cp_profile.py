"""The context-parallel profile's arithmetic (ops/lab/cp_profile.py), on the CPU: the GPU's busy time
is the union of kernel intervals (NCCL's stream overlaps the compute stream), and NCCL kernels are
counted as communication, not as "other"."""

from ops.lab.cp_profile import busy_us, kind


def test_busy_time_is_the_union_of_overlapping_kernels():
    assert busy_us([]) == 0
    assert busy_us([(0, 10), (20, 30)]) == 20  # a 10 µs gap is idle
    assert busy_us([(0, 10), (5, 15), (12, 13)]) == 15  # overlaps count once
    assert busy_us([(20, 30), (0, 25)]) == 30  # in any order


def test_nccl_kernels_are_communication():
    assert kind("ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)") == "communication"
    assert kind("nvjet_sm90_tst_320x128_64x3_2x1_v_bz_coopB_TNT") == "matrix products"
