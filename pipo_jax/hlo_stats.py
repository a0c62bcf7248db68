"""Counts read from an optimized HLO module's text (`compiled.as_text()`): FLOPs, bytes, collectives, per op.

Why not `compiled.cost_analysis()` alone: XLA's cost analysis visits the body of a while loop once, so for a
step whose layers run in a `lax.scan` (and whose micro-batches run in another) its FLOPs and bytes are off by
the product of the trip counts (~100x for a 36-layer model with 32 accumulation steps). Here every
computation gets a multiplicity: ENTRY 1, a while body `trip_count` times its caller's (the trip count read
from the compiler's `known_trip_count` annotation, else from the loop condition `i < N`), fusions / calls /
conditional branches their caller's. The counts per instruction are then multiplied by it.

Per instruction:
  flops      dots 2 * out_elements * contracted size; convolutions (the TPU compiler turns dots into them, batched
             ones into base-dilated windows) 2 * out_elements * input features * the window taps that land on a
             real input element (not padding, not a dilation hole); elementwise arithmetic 1 per output element,
             reductions 1 per input element (the conventions of XLA's HloCostAnalysis, which
             `cost_analysis()["flops"]` reports)
  bytes      top-level instructions only (what moves through HBM): output + operands, where a fusion operand
             used only through (dynamic-)slices counts the slices, and an in-place dynamic-update-slice counts
             the update, not the whole buffer
  collective all-gather / reduce-scatter / all-reduce / all-to-all / collective-permute (sync, `-start`
             async forms and the TPU's `all-reduce-scatter` custom fusions); bytes = the larger of its input
             and output arrays (the gathered, or not yet scattered, size)

`analyze(text)` returns module totals (also the once-counted totals, to compare with cost_analysis) and the
top-level instructions ranked by their own cost, each with the `op_name` / source line of its metadata so a
fusion can be named back to model code.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict

DTYPE_BYTES = {
  "pred": 1,
  "s4": 0.5,
  "u4": 0.5,
  "s8": 1,
  "u8": 1,
  "f8e4m3fn": 1,
  "f8e5m2": 1,
  "f8e4m3b11fnuz": 1,
  "s16": 2,
  "u16": 2,
  "f16": 2,
  "bf16": 2,
  "s32": 4,
  "u32": 4,
  "f32": 4,
  "s64": 8,
  "u64": 8,
  "f64": 8,
  "c64": 8,
  "c128": 16,
  "token": 0,
}
_ARRAY = re.compile(r"\b(" + "|".join(sorted(DTYPE_BYTES, key=len, reverse=True)) + r")\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY )?%(\S+) \(.*\) -> .* \{$")
_INSTR = re.compile(r"^\s*(ROOT )?%(\S+) = ")

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
# Ops that move no data of their own (structure, aliasing, bookkeeping).
_FREE = {
  "parameter",
  "get-tuple-element",
  "tuple",
  "bitcast",
  "constant",
  "while",
  "call",
  "conditional",
  "after-all",
  "partition-id",
  "replica-id",
  "iota",
  "opt-barrier",
  "add-dependency",
  "copy-done",
  "all-gather-done",
  "all-reduce-done",
  "collective-permute-done",
  "async-done",
  "send-done",
  "recv-done",
}
_ELEMENTWISE = {
  "add",
  "subtract",
  "multiply",
  "divide",
  "maximum",
  "minimum",
  "power",
  "remainder",
  "atan2",
  "exponential",
  "exponential-minus-one",
  "log",
  "log-plus-one",
  "tanh",
  "logistic",
  "sqrt",
  "rsqrt",
  "cbrt",
  "sine",
  "cosine",
  "tan",
  "erf",
  "negate",
  "abs",
  "sign",
  "compare",
  "select",
  "clamp",
  "and",
  "or",
  "xor",
  "not",
  "floor",
  "ceil",
  "round-nearest-even",
  "round-nearest-afz",
}


def array_shapes(shape: str) -> list:
  """All (dtype, dims) arrays in a shape string (a tuple shape gives several)."""
  return [(d, tuple(int(x) for x in dims.split(",") if x)) for d, dims in _ARRAY.findall(shape)]


def shape_bytes(shape: str) -> int:
  return int(sum(DTYPE_BYTES[d] * math.prod(dims) for d, dims in array_shapes(shape)))


def _elements(shape: str) -> int:
  return sum(math.prod(dims) for _, dims in array_shapes(shape))


@dataclasses.dataclass
class Instr:
  name: str
  shape: str
  opcode: str
  operands: list
  attrs: str
  root: bool = False
  args: str = ""  # the raw text between the opcode's parentheses (a constant's literal, a parameter's index)

  def attr(self, key: str) -> str | None:
    m = re.search(r"\b" + re.escape(key) + r"=(%?[^,\s{}]+|\{[^}]*\})", self.attrs)
    return m.group(1) if m else None

  @property
  def op_name(self) -> str:
    m = re.search(r'op_name="([^"]*)"', self.attrs)
    return m.group(1) if m else ""

  @property
  def source(self) -> str:
    f, ln = re.search(r'source_file="([^"]*)"', self.attrs), re.search(r"source_line=(\d+)", self.attrs)
    return f"{f.group(1)}:{ln.group(1)}" if f and ln else ""


def _matching(s: str, i: int) -> int:
  """Index just past the bracket group opening at s[i]."""
  depth, pairs = 0, {"(": ")", "{": "}", "[": "]"}
  closers = set(pairs.values())
  for j in range(i, len(s)):
    c = s[j]
    if c in pairs:
      depth += 1
    elif c in closers:
      depth -= 1
      if depth == 0:
        return j + 1
  return len(s)


def _parse_instr(line: str) -> Instr | None:
  m = _INSTR.match(line)
  if not m:
    return None
  rest = line[m.end() :]
  if rest.startswith("("):
    end = _matching(rest, 0)
    shape, rest = rest[:end], rest[end:].lstrip()
  else:
    shape, _, rest = rest.partition(" ")
  p = rest.find("(")
  opcode = rest[:p]
  end = _matching(rest, p)
  operands = re.findall(r"%([^\s,()]+)", rest[p + 1 : end - 1])
  return Instr(m.group(2), shape, opcode, operands, rest[end:], bool(m.group(1)), rest[p + 1 : end - 1])


def parse_module(text: str) -> tuple:
  """(computations {name: [Instr]}, entry name)."""
  comps, entry, cur = {}, None, None
  for line in text.splitlines():
    h = _HEADER.match(line)
    if h:
      cur = comps.setdefault(h.group(2), [])
      if h.group(1):
        entry = h.group(2)
      continue
    if line.startswith("}"):
      cur = None
      continue
    if cur is not None:
      ins = _parse_instr(line)
      if ins:
        cur.append(ins)
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  return comps, entry


def _trip_count(while_ins: Instr, comps: dict) -> int | None:
  m = re.search(r'"known_trip_count":\{"n":"(\d+)"', while_ins.attrs)
  if m:
    return int(m.group(1))
  cond = comps.get((while_ins.attr("condition") or "").lstrip("%"), [])
  consts = {i.name: i for i in cond if i.opcode == "constant"}
  for ins in cond:
    if ins.root and ins.opcode == "compare" and "direction=LT" in ins.attrs:
      if len(ins.operands) == 2 and ins.operands[1] in consts and re.fullmatch(r"-?\d+", consts[ins.operands[1]].args):
        return int(consts[ins.operands[1]].args)  # jax loops count i = 0, 1, ... while i < N
  return None


def _callees(ins: Instr) -> list:
  """(computation, factor kind) pairs an instruction runs: body / condition / calls / branches."""
  out = []
  for key in ("body", "condition", "calls", "to_apply"):
    v = ins.attr(key)
    if v and v.startswith("%"):
      out.append((v[1:], key))
  b = re.search(r"branch_computations=\{([^}]*)\}", ins.attrs)
  if b:
    out += [(x.strip().lstrip("%"), "branch") for x in b.group(1).split(",")]
  for key in ("true_computation", "false_computation"):
    v = ins.attr(key)
    if v:
      out.append((v.lstrip("%"), "branch"))
  return out


def _sizes(comps: dict) -> dict:
  """Instructions per computation, its callees' included (a proxy for what running it costs)."""
  memo: dict = {}

  def size(c: str) -> int:
    if c not in memo:
      memo[c] = 0  # guards against cycles (there are none in HLO)
      memo[c] = sum(1 + sum(size(k) for k, _ in _callees(i) if k in comps) for i in comps[c])
    return memo[c]

  return {c: size(c) for c in comps}


def multiplicities(comps: dict, entry: str) -> tuple:
  """({computation: times it runs per module execution}, [(while name, trip count or None)]).

  A conditional runs one branch: its largest (by instructions, callees included) is counted, the others not,
  so the figures are those of the costliest path (e.g. pipo's decode loop with phase 2, not both loops)."""
  sizes = _sizes(comps)
  edges, indeg, loops = defaultdict(list), defaultdict(int), []
  for cname, instrs in comps.items():
    for ins in instrs:
      if ins.opcode in (
        "reduce",
        "reduce-window",
        "scatter",
        "sort",
        "map",
        "select-and-scatter",
        "all-reduce",
        "reduce-scatter",
        "all-reduce-start",
      ):
        continue  # their to_apply is a scalar combiner, not a computation that runs once per call
      trip = None
      if ins.opcode == "while":
        trip = _trip_count(ins, comps)
        loops.append((ins.name, trip))
      callees = [(c, k) for c, k in _callees(ins) if c in comps]
      branches = [c for c, k in callees if k == "branch"]
      taken = max(branches, key=lambda c: sizes[c]) if branches else None
      for callee, kind in callees:
        factor = (trip or 1) if kind == "body" else ((trip or 1) + 1) if kind == "condition" else 1
        if kind == "branch":
          factor, taken = (1, None) if callee == taken else (0, taken)  # the taken branch once
        edges[cname].append((callee, factor))
        indeg[callee] += 1
  mult = defaultdict(float)
  mult[entry] = 1.0
  ready, seen = [entry], set()
  while ready:  # Kahn's order over the call DAG: a callee's count is final once all its callers are done
    c = ready.pop()
    seen.add(c)
    for callee, f in edges.get(c, []):
      mult[callee] += mult[c] * f
      indeg[callee] -= 1
      if indeg[callee] == 0:
        ready.append(callee)
  return dict(mult), loops


def _window_field(attrs: str, key: str, n: int, default: int) -> list:
  """One `window={...}` field ('size', 'stride', 'lhs_dilate', 'rhs_dilate') as n ints."""
  m = re.search(r"window=\{([^}]*)\}", attrs)
  f = re.search(r"\b" + key + r"=([\dx]+)", m.group(1)) if m else None
  return [int(x) for x in f.group(1).split("x")] if f else [default] * n


def _window_pads(attrs: str, n: int) -> list:
  m = re.search(r"window=\{([^}]*)\}", attrs)
  f = re.search(r"\bpad=([\d_x-]+)", m.group(1)) if m else None
  return [tuple(int(v) for v in p.split("_")) for p in f.group(1).split("x")] if f else [(0, 0)] * n


def _taps(n: int, size: int, stride: int, lo: int, hi: int, lhs_dilate: int, rhs_dilate: int) -> int:
  """(output position, window tap) pairs of one spatial dimension that land on a real input element: not in the
  padding, not in a hole of the base (lhs) dilation. XLA's HloCostAnalysis counts a convolution's FLOPs over these
  alone; the TPU compiler writes batched dots as base-dilated convolutions whose other taps are all holes."""
  dilated = (n - 1) * lhs_dilate + 1
  out = (dilated + lo + hi - (size - 1) * rhs_dilate - 1) // stride + 1
  total = 0
  for t in range(size):
    start = t * rhs_dilate - lo  # input position of output 0
    if stride == 1:  # positions start .. start + out - 1: count the multiples of lhs_dilate inside [0, dilated)
      a, b = max(start, 0), min(start + out - 1, dilated - 1)
      if a <= b:
        total += b // lhs_dilate - (a - 1) // lhs_dilate
    else:
      total += sum(
        1 for o in range(out) if 0 <= start + o * stride < dilated and (start + o * stride) % lhs_dilate == 0
      )
  return total


def _conv_flops(ins: Instr, shapes: dict) -> float:
  """2 x (batch x output features) x input features per group x the real taps of every spatial dimension."""
  if len(ins.operands) < 2 or ins.operands[0] not in shapes or ins.operands[1] not in shapes:
    return 0.0
  lhs, rhs = array_shapes(shapes[ins.operands[0]]), array_shapes(shapes[ins.operands[1]])
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.attrs)
  out = array_shapes(ins.shape)
  if not lhs or not rhs or not out or not labels:
    return 0.0
  lhs_lab, rhs_lab, out_lab = labels.groups()
  spatial = sorted(int(c) for c in lhs_lab if c.isdigit())
  k = len(spatial)
  size, stride = _window_field(ins.attrs, "size", k, 1), _window_field(ins.attrs, "stride", k, 1)
  ld, rd = _window_field(ins.attrs, "lhs_dilate", k, 1), _window_field(ins.attrs, "rhs_dilate", k, 1)
  pads = _window_pads(ins.attrs, k)
  taps = 1
  for j, d in enumerate(spatial):
    n = lhs[0][1][lhs_lab.index(str(d))]
    taps *= _taps(n, size[j], stride[j], pads[j][0], pads[j][1], ld[j], rd[j])
  bo = math.prod(x for x, c in zip(out[0][1], out_lab) if not c.isdigit())
  i = math.prod(x for x, c in zip(rhs[0][1], rhs_lab) if c == "i")
  return 2.0 * bo * i * taps


def _dot_contracted(ins: Instr, shapes: dict) -> int:
  if not ins.operands or ins.operands[0] not in shapes:
    return 0
  lhs = array_shapes(shapes[ins.operands[0]])
  m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attrs)
  if not lhs or not m:
    return 0
  return math.prod(lhs[0][1][int(i)] for i in m.group(1).split(",") if i)


def _flops(ins: Instr, shapes: dict) -> float:
  if ins.opcode == "dot":
    return 2.0 * _elements(ins.shape) * _dot_contracted(ins, shapes)
  if ins.opcode == "convolution":
    return _conv_flops(ins, shapes)
  if ins.opcode in _ELEMENTWISE:
    return float(_elements(ins.shape))
  if ins.opcode in ("reduce", "reduce-window") and ins.operands and ins.operands[0] in shapes:
    return float(_elements(shapes[ins.operands[0]]))
  return 0.0


def collective_kind(ins: Instr, comps: dict) -> str | None:
  op = ins.opcode[: -len("-start")] if ins.opcode.endswith("-start") else ins.opcode
  if op in COLLECTIVES:
    return op
  if ins.opcode == "fusion":  # TPU: collectives fused with their producer / consumer (kCustom fusions)
    callee = (ins.attr("calls") or "").lstrip("%")
    for k in ("all-reduce-scatter", "reduce-scatter", "all-gather", "all-reduce", "all-to-all", "collective-permute"):
      if callee.startswith(k):
        return "reduce-scatter" if k == "all-reduce-scatter" else k
    inner = {i.opcode for i in comps.get(callee, [])}
    for k in COLLECTIVES:
      if k in inner or k + "-start" in inner:
        return k
  return None


def _param_read_bytes(body: list, param: str, full: float, comps: dict, depth: int = 0) -> float:
  """Bytes a fusion body reads of its parameter `param` (`full` = the whole operand): the slices when every
  use is a (dynamic-)slice or gather, also through nested fusions (the TPU fuses a layer's dynamic-slice of
  a stacked cache or weight into the matmul fusion that reads it); 0 when it is only updated in place."""
  uses = [(i, pos) for i in body for pos, o in enumerate(i.operands) if o == param]
  if not uses:
    return full
  if all(u.opcode == "dynamic-update-slice" and pos == 0 for u, pos in uses):
    return 0.0  # updated in place: the write is counted with the output
  total = 0.0
  for u, pos in uses:
    if u.opcode in ("dynamic-slice", "slice", "gather") and pos == 0:
      total += shape_bytes(u.shape)
    elif u.opcode == "fusion" and depth < 4 and (u.attr("calls") or "").lstrip("%") in comps:
      inner = comps[(u.attr("calls") or "").lstrip("%")]
      inner_param = next((i.name for i in inner if i.opcode == "parameter" and i.args == str(pos)), None)
      if inner_param is None:
        return full
      total += _param_read_bytes(inner, inner_param, full, comps, depth + 1)
    else:
      return full
  return min(total, full)


def _fusion_operand_bytes(ins: Instr, comps: dict, shapes: dict) -> float:
  """Operand bytes a fusion reads: a parameter used only through (dynamic-)slices reads the slices."""
  body = comps.get((ins.attr("calls") or "").lstrip("%"))
  if body is None:
    return sum(shape_bytes(shapes.get(o, "")) for o in ins.operands)
  total = 0.0
  for i in body:
    if i.opcode != "parameter" or not i.args.isdigit() or int(i.args) >= len(ins.operands):
      continue
    full = shape_bytes(shapes.get(ins.operands[int(i.args)], ""))
    total += _param_read_bytes(body, i.name, full, comps)
  return total


def _fusion_output_bytes(ins: Instr, comps: dict, shapes: dict) -> float:
  body = comps.get((ins.attr("calls") or "").lstrip("%"), [])
  by_name = {i.name: i for i in body}
  root = next((i for i in body if i.root), None)
  outs = [by_name.get(o) for o in root.operands] if root is not None and root.opcode == "tuple" else [root]
  if not outs or any(o is None for o in outs):
    return shape_bytes(ins.shape)
  total = 0.0
  local = {i.name: i.shape for i in body}
  for o in outs:
    if o.opcode == "dynamic-update-slice" and len(o.operands) > 1:
      total += shape_bytes(local.get(o.operands[1], o.shape))
    else:
      total += shape_bytes(o.shape)
  return total


def _bytes(ins: Instr, comps: dict, shapes: dict) -> float:
  if ins.opcode in _FREE or (ins.opcode == "custom-call" and "AllocateBuffer" in ins.attrs):
    return 0.0
  if ins.opcode == "fusion":
    return _fusion_operand_bytes(ins, comps, shapes) + _fusion_output_bytes(ins, comps, shapes)
  if ins.opcode == "dynamic-update-slice" and len(ins.operands) > 1:
    return 2.0 * shape_bytes(shapes.get(ins.operands[1], ""))
  if ins.opcode in ("dynamic-slice", "slice"):
    return 2.0 * shape_bytes(ins.shape)
  return shape_bytes(ins.shape) + sum(shape_bytes(shapes.get(o, "")) for o in ins.operands)


def _fused_names(comps: dict) -> set:
  """Computations that are fusion bodies (their instructions' bytes stay on chip)."""
  out = set()
  for instrs in comps.values():
    for i in instrs:
      if i.opcode == "fusion" and i.attr("calls"):
        out.add(i.attr("calls").lstrip("%"))
  return out


def _label(ins: Instr, comps: dict) -> tuple:
  """(op_name, source) naming an instruction back to model code: for a fusion, its costliest inner op."""
  if ins.opcode == "fusion":
    body = comps.get((ins.attr("calls") or "").lstrip("%"), [])
    local = {i.name: i.shape for i in body}
    best = max(body, key=lambda i: (_flops(i, local), bool(i.op_name)), default=None)
    if best is not None and best.op_name:
      return best.op_name, best.source
  return ins.op_name, ins.source


def analyze(text: str, top: int = 10) -> dict:
  """Module totals (trip-count corrected and once-counted), collectives by kind, the `top` costliest ops."""
  comps, entry = parse_module(text)
  mult, loops = multiplicities(comps, entry)
  fused = _fused_names(comps)
  totals = {"flops": 0.0, "flops_once": 0.0, "bytes": 0.0, "bytes_once": 0.0, "dot_flops": 0.0}
  coll = {k: {"count": 0, "bytes": 0.0, "count_static": 0, "largest_bytes": 0} for k in COLLECTIVES}
  largest, ops = [], []
  for cname, instrs in comps.items():
    m = mult.get(cname, 0.0)
    shapes = {i.name: i.shape for i in instrs}
    top_level = cname not in fused
    for ins in instrs:
      f = _flops(ins, shapes)
      totals["flops"] += f * m
      totals["flops_once"] += f
      if ins.opcode in ("dot", "convolution"):
        totals["dot_flops"] += f * m
      if not top_level:
        continue
      b = _bytes(ins, comps, shapes)
      totals["bytes"] += b * m
      totals["bytes_once"] += b
      kind = collective_kind(ins, comps)
      if kind:
        size = max(
          [shape_bytes(ins.shape) if not ins.opcode.endswith("-start") else 0]
          + [DTYPE_BYTES[d] * math.prod(dims) for d, dims in array_shapes(ins.shape)]
          + [shape_bytes(shapes.get(o, "")) for o in ins.operands]
        )
        c = coll[kind]
        c["count"] += int(round(m))
        c["count_static"] += 1
        c["bytes"] += size * m
        c["largest_bytes"] = max(c["largest_bytes"], int(size))
        largest.append(
          {"kind": kind, "bytes": int(size), "times": int(round(m)), "shape": ins.shape[:200], "op_name": ins.op_name}
        )
        continue
      if ins.opcode in _FREE or m == 0:
        continue
      fl = f
      if ins.opcode == "fusion":
        body = comps.get((ins.attr("calls") or "").lstrip("%"), [])
        local = {i.name: i.shape for i in body}
        fl = sum(_flops(i, local) for i in body)
      op_name, source = _label(ins, comps)
      ops.append(
        {
          "name": ins.name,
          "opcode": ins.opcode,
          "times": m,
          "flops": fl * m,
          "bytes": b * m,
          "op_name": op_name,
          "source": source,
          "shape": ins.shape[:120],
        }
      )
  for c in coll.values():
    c["bytes"] = int(c["bytes"])
  largest.sort(key=lambda x: -x["bytes"] * max(x["times"], 1))
  return {
    "flops": totals["flops"],
    "flops_once": totals["flops_once"],
    "dot_flops": totals["dot_flops"],
    "bytes": totals["bytes"],
    "bytes_once": totals["bytes_once"],
    "collectives": coll,
    "largest_collectives": largest[:top],
    "loops": [{"while": n, "trip_count": t} for n, t in loops],
    "unknown_trip_counts": sum(t is None for _, t in loops),
    "ops": ops,
  }


def top_ops(ops: list, peak_flops: float, hbm_bytes_per_s: float, n: int = 10) -> list:
  """The n ops with the largest roofline time max(flops / peak, bytes / bandwidth), with that time."""
  for o in ops:
    o["seconds"] = max(o["flops"] / peak_flops, o["bytes"] / hbm_bytes_per_s)
    o["bound"] = "compute" if o["flops"] / peak_flops >= o["bytes"] / hbm_bytes_per_s else "memory"
  return sorted(ops, key=lambda o: -o["seconds"])[:n]


def main(argv=None):
  """`python -m pipo_jax.hlo_stats STEP.hlo.gz --chip=v5p`: totals, collectives and the costliest ops of a dump
  (memory_plan --target=tpu --dump_hlo=...)."""
  import argparse
  import gzip

  from pipo_jax.tpu_plan import CHIPS

  ap = argparse.ArgumentParser(description=main.__doc__)
  ap.add_argument("hlo")
  ap.add_argument("--chip", default="v5p", choices=sorted(CHIPS))
  ap.add_argument("--top", type=int, default=10)
  a = ap.parse_args(argv)
  opener = gzip.open if a.hlo.endswith(".gz") else open
  with opener(a.hlo, "rt") as f:
    r = analyze(f.read(), top=a.top)
  c = CHIPS[a.chip]
  print(
    f"{r['flops'] / 1e12:.2f} TFLOP, {r['bytes'] / 2**30:.1f} GiB per chip per step (loops multiplied out; "
    f"once-counted {r['flops_once'] / 1e12:.2f} TFLOP); loops {[l['trip_count'] for l in r['loops']]}"
  )
  for k, v in r["collectives"].items():
    print(f"  {k:18s} {v['count']:7d} x, {v['bytes'] / 2**30:8.2f} GiB, largest {v['largest_bytes'] / 2**20:.1f} MiB")
  total = sum(max(o["flops"] / c["peak_flops"], o["bytes"] / c["hbm_bw"]) for o in r["ops"])
  print(f"sum of per-op roofline times {total:.3f} s on {a.chip}; the costliest:")
  for o in top_ops(r["ops"], c["peak_flops"], c["hbm_bw"], a.top):
    print(
      f"  {o['seconds']:8.4f} s {100 * o['seconds'] / total:5.1f}% {o['bound']:7s} x{o['times']:<6.0f} "
      f"{o['flops'] / 1e12:8.2f} TFLOP {o['bytes'] / 2**30:8.2f} GiB  {o['opcode']} {o['op_name'][:110]} "
      f"{o['source']}"
    )


if __name__ == "__main__":
  main()
