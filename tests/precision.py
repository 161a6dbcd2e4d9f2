"""The precision a test means, said in its config: parity and agreement tests compare with fp32
references and bounds, and runtime.precision=auto picks bf16 on CPUs with AMX-BF16 or
AVX512-BF16 (runtime/device.py). The choice itself is tested in test_precision.py."""

FP32 = "runtime.precision=fp32"


def fp32_unless_set(overrides):
    """`overrides` with runtime.precision=fp32 appended unless they set a precision themselves."""
    if any(o.startswith("runtime.precision=") for o in overrides):
        return list(overrides)
    return [*overrides, FP32]
