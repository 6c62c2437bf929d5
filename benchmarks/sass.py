"""Reading SASS (``cuobjdump -sass``): instructions, control flow, loops, and what sits inside them.

Loops are found the textbook way, not by scanning between labels: basic blocks from the branch
instructions, dominators over the control-flow graph, a back edge ``u → h`` wherever ``h`` dominates
``u``, and the natural loop of that edge (``h`` plus every block that reaches ``u`` without passing
``h``). A retreating edge whose target does not dominate its source (irreducible flow; ptxas does not
emit it for Triton kernels) still counts: every block laid out between target and source is taken as
inside. A subroutine called from a loop returns into it, so its blocks count as inside it.

What the compile gate asks of a kernel: local-memory instructions (``LDL``/``STL``: spills) and
GPU-wide memory fences (``MEMBAR.*.GPU``, ``CCTL`` cache invalidation) inside loops, compare-and-swap atomics, and the
MMA instructions used (``HMMA`` = mma.sync, ``HGMMA`` = wgmma, ``UTC*MMA`` = tcgen05).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_HEX = re.compile(r"0x([0-9a-f]+)")
_BRANCHES = ("BRA", "JMP", "BRX", "JMX", "CALL", "RET", "EXIT")


@dataclass
class Instruction:
    offset: int
    guard: str  # "" (always), "@P0", "@!P1", ...
    opcode: str  # with modifiers: "LDL.LU.64", "HGMMA.64x128x16.F32.BF16"
    operands: str

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]

    @property
    def conditional(self) -> bool:
        """Guarded by a predicate, or a branch with a condition operand (``BRA.U !UP0, 0x..``, ``BRA.DIV``)."""
        return self.guard not in ("", "@PT") or (self.base == "BRA" and "," in self.operands)

    @property
    def never(self) -> bool:
        return self.guard == "@!PT"

    @property
    def target(self) -> int | None:
        if self.base not in ("BRA", "JMP", "CALL"):
            return None
        found = _HEX.findall(self.operands)
        return int(found[-1], 16) if found else None


def parse(sass: str) -> list[Instruction]:
    """Instructions of the (single) function in ``cuobjdump -sass`` output, in address order."""
    out = []
    for line in sass.splitlines():
        match = _LINE.search(line)
        if not match:
            continue
        offset, text = int(match.group(1), 16), match.group(2).strip()
        guard = ""
        if text.startswith("@"):
            guard, text = text.split(None, 1)
        opcode, _, operands = text.partition(" ")
        out.append(Instruction(offset, guard, opcode, operands.strip()))
    return out


@dataclass
class Block:
    start: int  # index of the first instruction
    end: int  # one past the last
    succ: list[int] = field(default_factory=list)


def basic_blocks(instrs: list[Instruction]) -> list[Block]:
    """Basic blocks and their successors. A ``CALL`` has two: its target and the instruction after it;
    a ``RET`` returns to the instruction after every call site (conservative for several call sites).
    ptxas also uses ``CALL.REL.NOINC`` for a predicated exit from a loop: its target then never returns
    into the loop, so it does not join the loop."""
    index_of = {ins.offset: i for i, ins in enumerate(instrs)}
    leaders = {0}
    for i, ins in enumerate(instrs):
        if ins.base in _BRANCHES and not ins.never:
            if i + 1 < len(instrs):
                leaders.add(i + 1)
            if ins.target in index_of:
                leaders.add(index_of[ins.target])
    starts = sorted(leaders)
    blocks = [Block(s, e) for s, e in zip(starts, starts[1:] + [len(instrs)])]
    block_at = {b.start: k for k, b in enumerate(blocks)}
    return_points, returning = [], []
    for k, b in enumerate(blocks):
        last = instrs[b.end - 1]
        falls_through = k + 1 < len(blocks)
        if last.base in _BRANCHES and not last.never:
            target = block_at.get(index_of.get(last.target, -1))
            if target is not None and last.base in ("BRA", "JMP", "CALL"):
                b.succ.append(target)
            if last.base == "CALL" and falls_through:
                return_points.append(k + 1)
            if last.base == "RET":
                returning.append(k)
            falls_through = falls_through and (last.conditional or last.base == "CALL")
        if falls_through:
            b.succ.append(k + 1)
    for k in returning:
        blocks[k].succ.extend(p for p in return_points if p not in blocks[k].succ)
    return blocks


def dominators(blocks: list[Block], live: set[int]) -> list[set[int]]:
    """Dominator sets of the blocks in ``live`` (reachable ones; unreachable predecessors are ignored)."""
    n = len(blocks)
    preds = [[] for _ in range(n)]
    for k, b in enumerate(blocks):
        if k in live:
            for s in b.succ:
                preds[s].append(k)
    dom = [set(live) for _ in range(n)]
    dom[0] = {0}
    changed = True
    while changed:
        changed = False
        for k in sorted(live - {0}):
            new = set.intersection(*(dom[p] for p in preds[k])) if preds[k] else set()
            new = new | {k}
            if new != dom[k]:
                dom[k], changed = new, True
    return dom


def reachable(blocks: list[Block]) -> set[int]:
    """Blocks reachable from the entry."""
    seen, stack = set(), [0]
    while stack:
        x = stack.pop()
        if x not in seen:
            seen.add(x)
            stack.extend(blocks[x].succ)
    return seen


def loops(blocks: list[Block]) -> list[set[int]]:
    """Block sets of every reachable loop: natural loops of back edges, and for a retreating edge whose
    target does not dominate its source, every block laid out between them. The padding after the last
    ``EXIT`` (a ``BRA`` to itself) is unreachable and ignored."""
    live = reachable(blocks)
    dom = dominators(blocks, live)
    preds = [[] for _ in blocks]
    for k, b in enumerate(blocks):
        if k in live:
            for s in b.succ:
                preds[s].append(k)
    found = []
    for u in sorted(live):
        for h in blocks[u].succ:
            if h in dom[u]:  # back edge: natural loop
                body, stack = {h, u}, [u]
                while stack:
                    x = stack.pop()
                    if x == h:
                        continue
                    for p in preds[x]:
                        if p not in body:
                            body.add(p)
                            stack.append(p)
                found.append(body)
            elif h <= u:  # retreating edge without a dominating target
                found.append(set(range(h, u + 1)) & live)
    return found


@dataclass
class SassReport:
    instructions: int
    loops: int
    local_total: int  # LDL/STL anywhere
    local_in_loops: int  # LDL/STL inside a loop
    fences_in_loops: int  # MEMBAR / CCTL inside a loop
    cas: int  # compare-and-swap atomics (CAS loops)
    atomics: list[str]  # distinct atomic opcodes
    mma: str  # "tcgen05" | "wgmma" | "mma.sync" | "none"
    mma_in_loops: int


def _is_local(ins: Instruction) -> bool:
    return ins.base in ("LDL", "STL")


def _is_fence(ins: Instruction) -> bool:
    """GPU- or system-wide memory barriers and L1 invalidations (what acq_rel atomics emit); the CTA-scope
    ``MEMBAR.ALL.CTA`` + ``FENCE.VIEW.ASYNC`` pair that orders shared memory for wgmma does not count."""
    return (ins.base == "MEMBAR" and ".CTA" not in ins.opcode) or ins.base in ("CCTL", "CCTLL")


def _mma_kind(opcode: str) -> str | None:
    base = opcode.split(".")[0]
    if base.startswith("UTC") and "MMA" in base:
        return "tcgen05"
    if base == "HGMMA":
        return "wgmma"
    if base in ("HMMA", "IMMA", "DMMA"):
        return "mma.sync"
    return None


def analyse(sass: str) -> SassReport:
    instrs = parse(sass)
    blocks = basic_blocks(instrs)
    in_loop = set()
    found = loops(blocks)
    for body in found:
        for k in body:
            in_loop.update(range(blocks[k].start, blocks[k].end))
    inside = [instrs[i] for i in sorted(in_loop)]
    kinds = {_mma_kind(i.opcode) for i in instrs} - {None}
    mma = next((k for k in ("tcgen05", "wgmma", "mma.sync") if k in kinds), "none")
    return SassReport(
        instructions=len(instrs),
        loops=len(found),
        local_total=sum(_is_local(i) for i in instrs),
        local_in_loops=sum(_is_local(i) for i in inside),
        fences_in_loops=sum(_is_fence(i) for i in inside),
        cas=sum(i.base.startswith("ATOM") and ".CAS" in i.opcode for i in instrs),
        atomics=sorted({i.opcode for i in instrs if i.base in ("RED", "REDG", "ATOM", "ATOMG")}),
        mma=mma,
        mma_in_loops=sum(_mma_kind(i.opcode) is not None for i in inside),
    )
