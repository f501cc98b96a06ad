"""Constants and formulas that Python and the kernels both use agree (no GPU
needed): the kernels' own definitions are checked by the compiler, through
static_asserts appended to a kernel source and compiled with NVRTC, against
the values Python computes; so nothing is parsed by hand."""
import pytest

from conftest import RANK

pytest.importorskip("cuda.core", reason="cuda-core is not installed")

from cupyep import jit
from cupyep.backends.gpu import backend as gpu_backend
from cupyep.backends.gpu import call_tags
from cupyep.backends.gpu import low_latency as gpu_low_latency
from cupyep.formats import fp8
from cupyep.formats import logfmt
from cupyep.layouts import sizing  # noqa: E402
from cupyep.layouts import low_latency as ll  # noqa: E402
from cupyep.jit import KernelSpec  # noqa: E402

_HIDDENS = (128, 2048, 4096, 5120, 7168, 8192)


def _c_float(v: float) -> str:
    return f"{float(v)!r}f"


def _static_asserts():
    """(C++ condition, what it checks) pairs, in namespace cupyep."""
    checks = [
        (f"kWarpSize * kLLWarps == {gpu_low_latency._THREADS}", "low-latency threads per block"),
        (f"kLLMaxTopk == {ll.LL_MAX_TOPK}", "low-latency top-k limit"),
        (f"kLLMaxRanks == {sizing.MAX_RANKS}", "rank limit"),
        (f"kLLHeaderBytes == {ll._HEADER_BYTES}", "low-latency message header"),
        (f"kLogFmtSendSmem == {gpu_low_latency._LOGFMT_SEND_SMEM}", "LogFMT combine's dynamic shared memory"),
        # dispatch flags [R] i64, then counts [R][L] i32, inside one half's dispatch-flag region
        (f"kLLCountsOffset + 4 * {ll.LL_MAX_EXPERTS} <= 8 * {ll.LL_MAX_EXPERTS}", "low-latency flag region"),
        (f"kLLTagShift == {call_tags.LL_TAG_SHIFT}", "low-latency call tag position in a flag"),
        (f"kFp8Group == {fp8.FP8_GROUP}", "FP8 scale group"),
        (f"kFp8Max == {_c_float(fp8.FP8_MAX)}", "FP8 max"),
        (f"kAmaxFloor == {_c_float(fp8.AMAX_FLOOR)}", "FP8 amax floor"),
        (f"kLogFmtGroupBytes == {logfmt.GROUP_BYTES}", "LogFMT bytes per group"),
        (f"kLogFmtRange == {_c_float(logfmt.LOG_RANGE)}", "LogFMT log range"),
        (f"kLogFmtSteps == {_c_float(logfmt.NUM_CODES - 2)}", "LogFMT steps"),
    ]
    for h in _HIDDENS:
        for f in (True, False):
            checks.append((f"ll_message_bytes({h}, {str(f).lower()}) == {ll.message_bytes(h, f)}",
                           f"message bytes, hidden {h}, fp8 {f}"))
        checks.append((f"logfmt_row_bytes({h}) == {logfmt.encoded_bytes(h)}", f"LogFMT row bytes, hidden {h}"))
    enum = {"kPhaseBarrier": "barrier", "kPhaseDispatchRecv": "dispatch.recv",
            "kPhaseCombineRecv": "combine.recv", "kPhaseLowLatencyDispatchRecv": "low_latency_dispatch.recv",
            "kPhaseLowLatencyCombineRecv": "low_latency_combine.recv", "kPhaseLowLatencySend": "low_latency.send",
            "kPhaseLowLatencyClean": "clean_low_latency_buffer"}
    b = gpu_backend
    for c_name, value in (("kErrFlag", b.ERR_FLAG), ("kErrPhase", b.ERR_PHASE), ("kErrPeer", b.ERR_PEER),
                          ("kErrChannel", b.ERR_CHANNEL), ("kErrKind", b.ERR_KIND), ("kErrBadItem", b.ERR_BAD_ITEM),
                          ("kErrMirror", b.ERR_MIRROR), ("kErrPeerTag", b.ERR_PEER_TAG),
                          ("kErrCallTag", b.ERR_CALL_TAG), ("kErrBadValue", b.ERR_BAD_VALUE),
                          ("kErrRunningTag", b.ERR_RUNNING_TAG),
                          ("kErrWords", b.ERR_WORDS), ("kErrTimeout", b.ERR_TIMEOUT),
                          ("kErrTooManyRows", b.ERR_TOO_MANY_ROWS), ("kErrCallMismatch", b.ERR_CALL_MISMATCH)):
        checks.append((f"{c_name} == {value}", f"error record {c_name}"))
    number = {name: n for n, name in gpu_backend.PHASES.items()}
    assert set(number) == set(enum.values()), "PHASES names a phase the kernels lack, or the reverse"
    for c_name, py_name in enum.items():
        checks.append((f"{c_name} == {number[py_name]}", f"phase {py_name}"))
    return checks


def test_kernel_constants_match_python():
    if RANK != 0:
        pytest.skip("compile checks run on rank 0 only")
    from cuda.core import Program
    checks = _static_asserts()
    spec = KernelSpec("cupyep/low_latency.cu", "cupyep::ll::combine", (("kHidden", 7168),), False)
    text = jit._source_text(spec) + "\nnamespace cupyep {\n" + "".join(
        f'static_assert({cond}, "{what}");\n' for cond, what in checks) + "}\n"
    try:
        Program(text, "c++", jit._options(spec, "sm_90")).compile("cubin")  # no instantiation: just the asserts
    except Exception as e:  # NVRTC's log names the static_assert that failed
        failed = [what for _, what in checks if what in str(e)]
        pytest.fail(f"kernel constants differ from Python's: {failed or str(e)[-2000:]}")
