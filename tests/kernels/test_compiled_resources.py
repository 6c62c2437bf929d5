"""The Triton kernels judged by their compiled code (no GPU needed): the compile gate on a fast subset,
proof that it catches a spilling config, and the SASS loop finder it relies on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import sass  # noqa: E402


def _nvidia_tools_present() -> bool:
    try:
        import triton
    except ImportError:
        return False
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return all((bin_dir / tool).exists() for tool in ("ptxas", "cuobjdump"))


needs_ptxas = pytest.mark.skipif(not _nvidia_tools_present(), reason="triton's bundled ptxas/cuobjdump not found")


def _compiling_env() -> dict:
    """The test session runs Triton interpreted; the gate's subprocess must compile."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


@pytest.mark.slow
@needs_ptxas
def test_compile_gate_bf16_on_sm90a_and_sm80(tmp_path):
    """Every kernel (bf16, the ci flag set: each mode with no extras and with all of them, every
    sampling-head row tile) compiles for sm_90a and sm_80 with no local memory, GPU-wide fence or CAS
    atomic inside a loop and shared memory within the per-block limit."""
    out = tmp_path / "gate.json"
    jobs = str(min(os.cpu_count() or 1, 4))
    cmd = [sys.executable, str(REPO / "benchmarks" / "kernel_resources.py"), "--archs", "90", "80",
           "--dtypes", "bfloat16", "--level", "ci", "--no-save", "--json", str(out), "-j", jobs]
    proc = subprocess.run(cmd, env=_compiling_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    import kernel_resources

    kernels = {r["kernel"] for r in result["rows"]}
    assert kernels == set(kernel_resources.KERNELS), kernels
    failing = [f"{r['arch']} {r['label']}: {why}" for r in result["rows"] for why in kernel_resources.problems(r)]
    assert not failing, "\n".join(failing)
    assert result["summary"]["local_in_loops_total"] == 0


@pytest.mark.slow
@needs_ptxas
def test_gate_catches_a_config_that_spills_in_its_loop():
    """The fp32 backward with the config main shipped (64×64×32, 4 warps, ieee FMA dots) spills
    kilobytes per thread inside its D loop: the gate must say so, and pass the table's config."""
    code = textwrap.dedent("""
        import json, sys
        sys.path[:0] = [sys.argv[1] + "/benchmarks", sys.argv[1]]
        import kernel_resources as kr
        from hypo_fast.kernels import launch
        ours = kr.compile_variant(kr.Variant("bwd", "float32", 90))
        launch.TILES["linear_logprobs_bwd"]["ieee"][90] = launch.TileConfig(64, 64, 32, num_warps=4, num_stages=3)
        old = kr.compile_variant(kr.Variant("bwd", "float32", 90))
        print(json.dumps({"ours": [ours, kr.problems(ours)], "old": [old, kr.problems(old)]}))
    """)
    proc = subprocess.run([sys.executable, "-c", code, str(REPO)], env=_compiling_env(), capture_output=True,
                          text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    old, old_problems = result["old"]
    assert old["local_in_loops"] > 100 and old["spill_stores"] > 1024, old
    assert any("inside loops" in p for p in old_problems), old_problems
    ours, our_problems = result["ours"]
    assert not our_problems and ours["spill_stores"] == 0, ours


# ---- the SASS loop finder ---------------------------------------------------------------------------

def _sass(lines: list[str]) -> str:
    """cuobjdump-style text from 'OPCODE operands' lines at 0x10 strides."""
    return "\n".join(f"        /*{16 * i:04x}*/                   {text} ;" for i, text in enumerate(lines))


def test_local_memory_inside_and_outside_a_loop():
    code = _sass([
        "STL [R1], R2",  # 0x00: before the loop
        "IADD3 R3, R3, 0x1, RZ",  # 0x10: loop head
        "LDL R4, [R1]",  # 0x20: in the loop
        "ISETP.GE.AND P0, PT, R3, R5, PT",
        "@!P0 BRA 0x10",  # 0x40: back edge
        "LDL R6, [R1]",  # after the loop
        "EXIT",
        "BRA 0x70",  # padding: unreachable self-loop
    ])
    report = sass.analyse(code)
    assert report.loops == 1
    assert report.local_total == 3 and report.local_in_loops == 1


def test_out_of_line_block_and_callee_of_a_loop_count_as_inside():
    """A block laid out after the back edge that jumps back into the loop, and a subroutine called from
    the loop, are inside it; a scan between the loop's first and last address would miss both."""
    code = _sass([
        "MOV R3, RZ",  # 0x00
        "IADD3 R3, R3, 0x1, RZ",  # 0x10: head
        "@P1 BRA 0x80",  # 0x20: to the out-of-line block
        "CALL.REL.NOINC 0xb0",  # 0x30: subroutine call inside the loop
        "ISETP.GE.AND P0, PT, R3, R5, PT",  # 0x40: latch
        "@!P0 BRA 0x10",  # 0x50: back edge
        "EXIT",  # 0x60
        "NOP",  # 0x70
        "STL [R1], R2",  # 0x80: out-of-line block, in the loop
        "BRA 0x40",  # 0x90: back into the loop
        "NOP",  # 0xa0
        "LDL R7, [R1+0x4]",  # 0xb0: subroutine body
        "RET.REL.NODEC R20 0x0",  # 0xc0
    ])
    report = sass.analyse(code)
    assert report.local_in_loops == 2, report


def test_an_exit_laid_out_inside_a_loop_is_not_in_it():
    """A block between a loop's head and its back edge that leaves the kernel is not part of the loop:
    an address-range scan would count its spill."""
    code = _sass([
        "MOV R3, RZ",  # 0x00
        "IADD3 R3, R3, 0x1, RZ",  # 0x10: head
        "@P2 BRA 0x50",  # 0x20: stay in the loop
        "STL [R1], R2",  # 0x30: the exit path, laid out inside the loop's address range
        "EXIT",  # 0x40
        "ISETP.GE.AND P0, PT, R3, R5, PT",  # 0x50: latch
        "@!P0 BRA 0x10",  # 0x60: back edge
        "EXIT",
    ])
    report = sass.analyse(code)
    assert report.loops == 1 and report.local_total == 1 and report.local_in_loops == 0


def test_fences_cas_and_mma_kind():
    code = _sass([
        "IADD3 R3, R3, 0x1, RZ",  # 0x00: head
        "MEMBAR.ALL.CTA",  # CTA-scope (wgmma's shared-memory fence): not counted
        "MEMBAR.ALL.GPU",
        "CCTL.IVALL",
        "ATOMG.E.CAS.STRONG.GPU PT, R8, [R4], R6, R7",
        "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24",
        "@!P0 BRA 0x0",
        "REDG.E.ADD.F32.FTZ.RN.STRONG.GPU [R2], R5",
        "EXIT",
    ])
    report = sass.analyse(code)
    assert report.fences_in_loops == 2 and report.cas == 1
    assert report.mma == "wgmma" and report.mma_in_loops == 1
    assert "REDG.E.ADD.F32.FTZ.RN.STRONG.GPU" in report.atomics


def test_uniform_predicate_branch_is_conditional():
    code = _sass([
        "IADD3 R3, R3, 0x1, RZ",  # 0x00: head
        "LDL R4, [R1]",
        "BRA.U !UP0, 0x0",  # conditional through its operand: a loop, and the code after it is reachable
        "STL [R1], R4",
        "EXIT",
    ])
    report = sass.analyse(code)
    assert report.loops == 1 and report.local_in_loops == 1 and report.local_total == 2
