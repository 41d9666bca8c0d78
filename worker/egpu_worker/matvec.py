"""Launch shapes for the dequantizing mat-vec kernels of decode, on GPUs.

Why this exists: tinygrad 0.14's hand-coded heuristic has a mat-vec rule (split each row's reduction across a
group of threads), but it only fires when the reduction multiplies two plain loads. Our weights are dequantized
inside the kernel (egpu_worker.quant), so the reduction multiplies a load by a dequantizing expression, the rule
does not match, and the kernel falls through to the generic path: one thread per 4 output rows walking the
whole row serially. For a 4096 x 4096 Q4_K matrix that is 1024 threads, and each thread's bytes are 2 KiB
apart from its neighbour's, so the reads do not coalesce. On an H200 that mat-vec took 46 us (205 GB/s); laid
out as below, 10 us (924 GB/s), and LLaMA-8B-shaped Q4_K decode went from 8.7 to 67.9 tok/s (BENCHMARKS.md).

`install()` wraps tinygrad's optimizer entry point (tinygrad.codegen.apply_opts). For a kernel that reads
quantized bytes (a uint8 input), has one sum reduction, and has at most a few decode rows, it lays the kernel
out like a GPU mat-vec: a workgroup takes `rows_local` output rows; within a row, `block_threads` x
`byte_threads` threads split the reduction (the first over the weight blocks, the second over the bytes of a
block, so neighbouring threads read neighbouring bytes), each thread reading `byte_unroll` consecutive bytes,
and the partial sums meet in shared memory. Each thread also computes `row_upcast` rows, reusing the loaded
activations. Every option is applied only if tinygrad accepts it (a shape it does not divide, a reduction too
small); a kernel no option applies to keeps tinygrad's own choice. Kernels without a uint8 input, devices
without shared memory (CPU), BEAM searches and kernels that already carry options are left alone.

The default layout was picked by timing 8 candidates on an H200 (bench/matvec_sweep.py; 2.73x tinygrad's own
schedule, geometric mean over SmolLM2 and LLaMA-8B shapes). It is untested on AMD. It can
be overridden with EGPU_MATVEC="t8,u4,b4,l4,r1" (byte_threads, byte_unroll, block_threads, rows_local,
row_upcast), or switched off with EGPU_MATVEC=off.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from tinygrad.codegen.opt import KernelOptError, Opt, OptOps
from tinygrad.dtype import dtypes
from tinygrad.helpers import prod
from tinygrad.uop.ops import AxisType, Ops

MAX_DECODE_ROWS = 16  # a batch axis larger than this is a prompt chunk: tinygrad's own choice serves it better
MAX_WORKGROUP = 256  # threads; a layout that would exceed it is not used (every GPU backend allows 256)


@dataclass(frozen=True)
class Layout:
  byte_threads: int = 16
  byte_unroll: int = 2
  block_threads: int = 2
  rows_local: int = 4
  row_upcast: int = 1

  @staticmethod
  def parse(text: str) -> "Layout":
    keys = {"t": "byte_threads", "u": "byte_unroll", "b": "block_threads", "l": "rows_local", "r": "row_upcast"}
    fields = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
      if part[0] not in keys or not part[1:].isdigit(): raise ValueError(f"bad EGPU_MATVEC part {part!r} (want e.g. t8,u4,b4,l4,r1)")
      fields[keys[part[0]]] = int(part[1:])
    return Layout(**fields)

  def __str__(self) -> str:
    return f"t{self.byte_threads},u{self.byte_unroll},b{self.block_threads},l{self.rows_local},r{self.row_upcast}"


DEFAULT_LAYOUT = Layout()


def layout_from_env() -> Layout | None:
  text = os.environ.get("EGPU_MATVEC", "").strip()
  if text.lower() in ("off", "0", "none"): return None
  return Layout.parse(text) if text else DEFAULT_LAYOUT


def _weight_ranges(k) -> set:
  """The ranges that index the uint8 (quantized weight) inputs of the kernel."""
  return {r for b in k.bufs if getattr(b.src[0].dtype, "base", b.src[0].dtype) == dtypes.uint8
          for r in b.src[1].get_idx().ranges}


def is_quantized_matvec(k) -> bool:
  """A kernel of sum reductions that reads uint8 (quantized) weights, where the output axes that do not index
  the weights (the decode rows sharing each weight) number at most MAX_DECODE_ROWS: the decode projections,
  possibly fused with their neighbours (two projections side by side, a residual add, a cache write). `k` is
  tinygrad's Scheduler."""
  if not (k.ren.has_local and k.ren.has_shared): return False
  # One reduction: a kernel holding two (SwiGLU's gate and up side by side) would need each one's thread group
  # as its own local axis, multiplying the work-group size and duplicating each reduction's loads across the
  # other's threads; the model realizes the gate on its own instead (Model.split_gate).
  reduces = k.reduceops
  if len(reduces) != 1 or reduces[0].arg[0] is not Ops.ADD: return False
  weight_ranges = _weight_ranges(k)
  if not weight_ranges: return False
  out_axes = k.axes_of(AxisType.GLOBAL)
  if not out_axes or not all(isinstance(k.full_shape[i], int) for i in out_axes): return False
  shared_rows = prod(k.full_shape[i] for i in out_axes if k.rngs[i] not in weight_ranges)
  weight_rows = prod(k.full_shape[i] for i in out_axes if k.rngs[i] in weight_ranges)
  return weight_rows >= 64 and shared_rows <= MAX_DECODE_ROWS


def _index(k, arg) -> int:
  return next(i for i, r in enumerate(k.rngs) if r.arg == arg)


def _try(k, opt: Opt) -> bool:
  try:
    k.apply_opt(opt)
    return True
  except KernelOptError:
    return False


def apply_layout(k, layout: Layout) -> bool:
  """Apply `layout` to the Scheduler `k` in place, option by option; False if not even one split of a
  reduction applied (then the caller keeps tinygrad's own choice). Each reduction (a kernel may hold two
  projections) is split the same way: its last axis is the bytes of a block, its first the blocks."""
  weight_ranges = _weight_ranges(k)
  splits = []
  for red in k.reduceops:
    axes = sorted((r for r in red.src[1:] if r.op is Ops.RANGE and r.arg[-1] is AxisType.REDUCE), key=lambda r: r.arg)
    if axes: splits.append((axes[-1].arg, axes[0].arg, int(axes[-1].vmax + 1)))
  out_axes = [i for i in k.axes_of(AxisType.GLOBAL) if k.rngs[i] in weight_ranges]
  if not splits or not out_axes: return False
  row_arg = k.rngs[max(out_axes, key=lambda i: k.full_shape[i])].arg
  grouped = False
  for byte_arg, _, byte_size in splits:
    threads = min(layout.byte_threads, byte_size)
    if threads >= byte_size: threads = byte_size // 2  # a group over a whole axis fails later in tinygrad 0.14's lowering
    # GROUPTOP: thread t of the group takes the t-th run of byte_size/threads consecutive bytes
    if threads > 1: grouped |= _try(k, Opt(OptOps.GROUPTOP, k.axes_of(AxisType.REDUCE).index(_index(k, byte_arg)), threads))
  if not grouped: return False
  if layout.block_threads > 1:
    for byte_arg, block_arg, _ in splits:
      if block_arg != byte_arg:
        _try(k, Opt(OptOps.GROUPTOP, k.axes_of(AxisType.REDUCE).index(_index(k, block_arg)), layout.block_threads))
  if layout.rows_local > 1: _try(k, Opt(OptOps.LOCAL, _index(k, row_arg), layout.rows_local))
  if layout.row_upcast > 1: _try(k, Opt(OptOps.UPCAST, _index(k, row_arg), layout.row_upcast))
  for byte_arg, _, _ in splits:
    remaining = k.full_shape[_index(k, byte_arg)]
    unroll = min(layout.byte_unroll, remaining)
    if unroll > 1 and remaining % unroll == 0:
      _try(k, Opt(OptOps.UNROLL, k.unrollable_dims.index(_index(k, byte_arg)), unroll))
  return True


def _workgroup_size(k) -> int:
  return prod(k.full_shape[i] for i in k.axes_of(AxisType.LOCAL, AxisType.GROUP_REDUCE))


def applies_to(device: str) -> bool:
  """Whether the layout is used on `device` (it is on, and the device has work-groups with shared memory)."""
  from tinygrad import Device
  ren = Device[device].renderer
  return layout_from_env() is not None and ren.has_local and ren.has_shared


_installed = False


def install() -> None:
  """Route tinygrad's optimizer through the mat-vec layout (idempotent). No-op when EGPU_MATVEC=off.

  tinygrad compiles in a pool of *spawned* processes when several kernels are new, and those do not inherit a
  patched module; so the pool's task function is replaced too, by one that installs the hook in the child
  before compiling (the environment, EGPU_MATVEC included, is inherited)."""
  global _installed
  layout = layout_from_env()
  if _installed or layout is None: return
  try:  # these are tinygrad 0.14 internals: another version keeps its own schedule rather than failing
    import tinygrad.codegen as codegen
    import tinygrad.engine.realize as realize
    from tinygrad.codegen.opt.postrange import Scheduler
    tinygrad_apply_opts, _ = codegen.apply_opts, realize._compile_kernel
  except (ImportError, AttributeError) as e:
    print(f"egpu-worker: GPU mat-vec layout not installed ({e!r}); tinygrad's own kernel schedule is used", file=sys.stderr)
    _installed = True
    return

  def apply_opts(ast, ren, beam: int = 0):
    own_choice = ast.tag is None and beam == 0 and (ast.arg is None or (ast.arg.opts_to_apply is None and ast.arg.applied_opts == ()))
    if own_choice and ren.has_local and ren.has_shared:
      k = Scheduler(ast, ren)
      k.convert_loop_to_global()
      if is_quantized_matvec(k) and apply_layout(k, layout) and _workgroup_size(k) <= MAX_WORKGROUP:
        return k.get_optimized_ast(name_override=ast.arg.name if ast.arg is not None and ast.arg.name != "test" else None)
    return tinygrad_apply_opts(ast, ren, beam)

  global _tinygrad_compile_kernel
  codegen.apply_opts = apply_opts
  _tinygrad_compile_kernel = realize._compile_kernel
  realize._compile_kernel = _compile_kernel_with_layout
  _installed = True


_tinygrad_compile_kernel = None


def _compile_kernel_with_layout(task):
  """tinygrad's pool task, run in a spawned compile process: install the hook there first."""
  install()
  return _tinygrad_compile_kernel(task)
