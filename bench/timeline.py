"""The GPU's timeline in a ``torch.profiler`` trace: how long the device was busy, how
long it sat idle between kernels, and which kinds of kernels took the busy time.

``bench.train_step --profile`` appends :func:`summarize` of its profiled steps to the op
tables: a step whose idle time is large is bound by the host (kernel launches, Python);
one with little idle time can only get faster by doing less work on the device.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

#: Kernel kinds by name, first match wins; anything else is "other". The names are those
#: of cuBLAS (nvjet, gemm), cuDNN / FlashAttention (sdpa, flash, fmha), Inductor's Triton
#: kernels and ATen's foreach/fused optimizer kernels. An Inductor kernel is named after
#: the ops it fuses, so it counts under the first kind any of them matches: a layer norm
#: fused with a residual add and a cast is "layer norm + residual", the Sinkhorn-Knopp
#: matrix-vector products (``mv``) fused with casts are "softmax, Sinkhorn-Knopp".
KERNEL_KINDS: tuple[tuple[str, str], ...] = (
    ("matmul", r"nvjet|gemm|cutlass|xmma|splitKreduce"),
    ("attention", r"sdpa|flash|fmha|attention|dot_do_o|convert_dq"),
    ("gelu", r"gelu"),
    ("layer norm + residual", r"layer_norm"),
    ("softmax, Sinkhorn-Knopp", r"softmax|logsumexp|_mv_|_mv$|amax"),
    ("optimizer / EMA (foreach)", r"adam|multi_tensor|foreach|lerp"),
    ("dtype casts and copies", r"_to_copy|copy|clone|cat|Memcpy"),
    ("memset", r"[Mm]emset"),
)
#: Trace categories of device activity (kernels, memsets and copies).
DEVICE_CATEGORIES = ("kernel", "gpu_memset", "gpu_memcpy")


@dataclass
class Timeline:
    """Per-step averages (milliseconds) over the profiled steps."""

    steps: int
    kernels: float
    span_ms: float
    busy_ms: float
    idle_ms: float
    gaps_over_20us_ms: float
    by_kind_ms: dict[str, float] = field(default_factory=dict)
    kernels_by_kind: dict[str, float] = field(default_factory=dict)
    #: kind -> its ``TOP_KERNELS`` kernel names with the most time: (name, ms, launches).
    top_kernels: dict[str, list[tuple[str, float, float]]] = field(default_factory=dict)
    #: The gaps over 20 us grouped by the kernels before and after them, most idle time
    #: first, at most ``TOP_KERNELS``: (kernel before, kernel after, host op that launched
    #: the kernel after, ms, gaps). The host op is the innermost CPU op around the launch
    #: call, "" when the trace does not link them.
    top_gaps: list[tuple[str, str, str, float, float]] = field(default_factory=list)


#: How many kernel names :func:`summarize` lists under each kind.
TOP_KERNELS = 4


def kernel_kind(name: str) -> str:
    for kind, pattern in KERNEL_KINDS:
        if re.search(pattern, name):
            return kind
    return "other"


def timeline(events: list[dict], steps: int) -> Timeline | None:
    """Busy and idle time of the device from chrome-trace ``events`` (``ph == "X"``
    entries with ``ts`` and ``dur`` in microseconds) of ``steps`` steps; None without any
    device activity (a CPU run). Overlapping kernels (several streams) count once."""
    work = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in DEVICE_CATEGORIES), key=lambda e: e["ts"])
    if not work:
        return None
    busy = big_gaps = 0.0
    end = None
    by_kind: dict[str, float] = {}
    counts: dict[str, float] = {}
    by_name: dict[str, list[float]] = {}  # name -> [microseconds, launches]
    gaps: dict[tuple[str, str], list] = {}  # (before, after) -> [microseconds, count, kernel after]
    last_name = ""
    for e in work:
        start, stop = float(e["ts"]), float(e["ts"]) + float(e["dur"])
        if end is None or start >= end:
            if end is not None and start - end > 20:
                big_gaps += start - end
                key = (last_name, e.get("name", ""))
                if key not in gaps:
                    gaps[key] = [0.0, 0, e]  # the first kernel after such a gap
                gaps[key][0] += start - end
                gaps[key][1] += 1
            busy += stop - start
            end = stop
        elif stop > end:
            busy += stop - end
            end = stop
        kind = kernel_kind(e.get("name", ""))
        by_kind[kind] = by_kind.get(kind, 0.0) + float(e["dur"])
        counts[kind] = counts.get(kind, 0) + 1
        totals = by_name.setdefault(e.get("name", ""), [0.0, 0])
        totals[0] += float(e["dur"])
        totals[1] += 1
        if stop >= end:
            last_name = e.get("name", "")
    span = end - float(work[0]["ts"])
    per_step = 1e3 * steps  # microseconds over all steps -> milliseconds per step
    return Timeline(
        steps=steps, kernels=len(work) / steps, span_ms=span / per_step, busy_ms=busy / per_step,
        idle_ms=(span - busy) / per_step, gaps_over_20us_ms=big_gaps / per_step,
        by_kind_ms={k: v / per_step for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        kernels_by_kind={k: counts[k] / steps for k in counts},
        top_kernels=_top_kernels(by_name, steps),
        top_gaps=[(before, after, _launching_op(events, kernel), us / 1e3 / steps, n / steps)
                  for (before, after), (us, n, kernel) in sorted(gaps.items(), key=lambda kv: -kv[1][0])[:TOP_KERNELS]],
    )


def _launching_op(events: list[dict], kernel: dict) -> str:
    """Name of the innermost CPU op around the runtime call that launched ``kernel``
    (linked by ``args.correlation``), or ""."""
    correlation = kernel.get("args", {}).get("correlation")
    launch = next((e for e in events if e.get("ph") == "X" and e.get("cat") == "cuda_runtime"
                   and e.get("args", {}).get("correlation") == correlation), None) if correlation is not None else None
    if launch is None:
        return ""
    t, tid = float(launch["ts"]), launch.get("tid")
    around = [e for e in events if e.get("ph") == "X" and e.get("cat") == "cpu_op" and e.get("tid") == tid
              and float(e["ts"]) <= t <= float(e["ts"]) + float(e["dur"])]
    return min(around, key=lambda e: float(e["dur"]))["name"] if around else ""


def _top_kernels(by_name: dict[str, list[float]], steps: int) -> dict[str, list[tuple[str, float, float]]]:
    top: dict[str, list[tuple[str, float, float]]] = {}
    for name, (us, launches) in sorted(by_name.items(), key=lambda kv: -kv[1][0]):
        rows = top.setdefault(kernel_kind(name), [])
        if len(rows) < TOP_KERNELS:
            rows.append((name, us / 1e3 / steps, launches / steps))
    return top


def summarize(events: list[dict], steps: int) -> str:
    """:func:`timeline` as text, one line per kernel kind."""
    t = timeline(events, steps)
    if t is None:
        return "GPU timeline: no device activity in the trace"
    lines = [
        f"GPU timeline, per step (mean of {t.steps}): span {t.span_ms:.1f} ms, busy {t.busy_ms:.1f} ms, "
        f"idle {t.idle_ms:.1f} ms ({t.gaps_over_20us_ms:.1f} ms in gaps over 20 us), {t.kernels:.0f} kernels",
    ]
    for kind, ms in t.by_kind_ms.items():
        lines.append(f"  {kind:28s} {ms:8.2f} ms  {t.kernels_by_kind[kind]:6.0f} kernels")
        for name, kernel_ms, launches in t.top_kernels.get(kind, []):
            lines.append(f"      {kernel_ms:8.2f} ms  {launches:6.0f} x  {name[:110]}")
    if t.top_gaps:
        lines.append("  gaps over 20 us, by the kernels around them")
        for before, after, launcher, gap_ms, count in t.top_gaps:
            lines.append(f"      {gap_ms:8.2f} ms  {count:6.1f} x  after {before[:60]}  before {after[:60]}"
                         + (f" (launched from {launcher})" if launcher else ""))
    return "\n".join(lines)
