"""Matmul FLOPs and collectives of a compiled (SPMD-partitioned, per-device) HLO module.

`analyze(compiled.as_text())` walks the module's call graph from ENTRY: fusions, calls and
async wrappers count once per call site, a while loop's body once per iteration. XLA's own
`cost_analysis()` counts a while body once, so for a model with scanned layers it reports
about one layer's FLOPs per stack; here the trip count is read from the loop: the
`known_trip_count` backend config where XLA records it (GPU), else the loop condition
`i < N` with the induction variable's constant start (TPU). A loop whose count cannot be
read is counted once and reported in `unknown_trip_counts` (its figures are then per
iteration).

FLOPs: 2 x output elements x contracted elements of every dot, convolution, cuBLAS GEMM and
cuDNN forward-convolution custom call (the matmul convention of `mmjax.summary`);
elementwise work is not counted.
Collectives: all-gather, all-reduce, reduce-scatter, all-to-all, collective-permute (sync or
the `-done` half of async pairs); bytes are the per-device result bytes.
"""
import collections
import dataclasses
import json
import math
import re

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5,
          "u4": 0.5, "s2": 0.25, "u2": 0.25}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%(\S+)\s")
_NAME = re.compile(r"^\s*(?:ROOT\s+)?%(\S+)\s*=\s*")
_OPCODE = re.compile(r"\s*([a-z][a-z0-9-]*)\(")
_CALLEE = re.compile(r"\b(calls|body|condition|to_apply|true_computation|false_computation)"
                     r"=%([^\s,)}]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_GEMM_TARGETS = ("__cublas$gemm", "__cublas$lt$matmul")
# XLA:GPU rewrites convolutions (forward and both gradients) into forward cuDNN calls, some
# fused with bias and activation, that keep the convolution's window and dim_labels.
_CUDNN_CONV = re.compile(r'custom_call_target="__cudnn\$conv\w*Forward"')


@dataclasses.dataclass
class Instruction:
  name: str
  shape: str  # result shape text, e.g. "bf16[128,1024]{1,0}" or a tuple "(...)"
  opcode: str
  operands: list[str]
  attrs: str  # everything after the operand list
  literal: int | None = None  # integer scalar constants only
  root: bool = False


@dataclasses.dataclass
class Collective:
  count: int = 0
  bytes: int = 0
  count_in_loops_of_unknown_trip_count: int = 0


@dataclasses.dataclass
class HloStats:
  matmul_flops: int
  collectives: dict[str, Collective]
  loops: list[dict]  # one per while: name, trip_count (None = unknown), multiplicity
  unknown_trip_counts: int

  def collectives_json(self) -> dict[str, dict]:
    return {k: dataclasses.asdict(v) for k, v in self.collectives.items()}


def shape_bytes(shape: str) -> int:
  """Bytes of an array or tuple shape ("(f32[4], bf16[2,3])"); layouts are ignored."""
  total = 0.0
  for dtype, dims in _ARRAY.findall(shape):
    size = _BYTES.get(dtype, 1)  # float8 variants (f8e4m3fn, ...): 1 byte
    total += size * math.prod(int(d) for d in dims.split(",") if d)
  return int(total)


def shape_dims(shape: str) -> list[int]:
  """Dimensions of the first array in `shape`."""
  match = _ARRAY.search(shape)
  return [int(d) for d in match[2].split(",") if d] if match else []


def _close(text: str, start: int) -> int:
  """Index just past the bracket group opening at text[start]."""
  depth = 0
  for i in range(start, len(text)):
    if text[i] in "([{":
      depth += 1
    elif text[i] in ")]}":
      depth -= 1
      if depth == 0:
        return i + 1
  return len(text)


def parse_instruction(line: str) -> Instruction | None:
  match = _NAME.match(line)
  if not match:
    return None
  rest = line[match.end():]
  if rest.startswith("("):
    end = _close(rest, 0)
  else:
    end = rest.find(" ")
  shape, rest = rest[:end], rest[end:]
  op = _OPCODE.match(rest)
  if not op:
    return None
  args_end = _close(rest, op.end() - 1)
  operands = re.findall(r"%([^\s,)]+)", rest[op.end():args_end - 1])
  return Instruction(match[1], shape, op[1], operands, rest[args_end:],
                     root=line.lstrip().startswith("ROOT "))


def parse_module(text: str) -> tuple[dict[str, list[Instruction]], str]:
  """(computation name -> instructions, ENTRY computation's name)."""
  computations, entry, current = {}, None, None
  for line in text.splitlines():
    if current is None:
      header = _HEADER.match(line)
      if header and line.rstrip().endswith("{"):
        current = header[2]
        computations[current] = []
        if header[1]:
          entry = current
    elif line.startswith("}"):
      current = None
    else:
      instruction = parse_instruction(line)
      if instruction is not None:
        computations[current].append(instruction)
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  return computations, entry


def matmul_flops(instruction: Instruction, shapes: dict[str, str]) -> int:
  """FLOPs of one dot / convolution / cuBLAS GEMM (0 for anything else)."""
  op, attrs = instruction.opcode, instruction.attrs
  if op == "dot":
    lhs = shape_dims(shapes.get(instruction.operands[0], ""))
    dims = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", attrs)
    contracted = math.prod(lhs[int(d)] for d in dims[1].split(",") if d) if dims else 1
  elif op == "convolution" or (op == "custom-call" and _CUDNN_CONV.search(attrs)):
    return _convolution_flops(instruction, shapes)
  elif op == "custom-call" and any(f'"{t}"' in attrs for t in _GEMM_TARGETS):
    lhs = shape_dims(shapes.get(instruction.operands[0], ""))
    config = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', attrs)
    dims = json.loads(f"[{config[1]}]") if config else []
    contracted = math.prod(lhs[int(d)] for d in dims)
  else:
    return 0
  return 2 * math.prod(shape_dims(instruction.shape)) * contracted


def _convolution_flops(instruction: Instruction, shapes: dict[str, str]) -> int:
  """2 x multiply-adds that touch real (not padding) input: XLA:TPU writes matmuls as
  convolutions and sometimes broadcasts an operand through a padded window."""
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", instruction.attrs)
  lhs = shape_dims(shapes.get(instruction.operands[0], ""))
  rhs = shape_dims(shapes.get(instruction.operands[1], ""))
  out = shape_dims(instruction.shape)
  if not labels or (len(labels[1]), len(labels[2]), len(labels[3])) != (len(lhs), len(rhs),
                                                                        len(out)):
    return 0
  lhs_labels, rhs_labels, out_labels = labels[1], labels[2], labels[3]
  window = _window(instruction.attrs, sum(c.isdigit() for c in lhs_labels))
  macs = math.prod(size for c, size in zip(rhs_labels, rhs) if c == "i")
  macs *= math.prod(size for c, size in zip(out_labels, out) if not c.isdigit())
  for d, (size, (pad_lo, _), stride, lhs_dilate, rhs_dilate) in enumerate(window):
    length = lhs[lhs_labels.index(str(d))] if str(d) in lhs_labels else 1
    outputs = out[out_labels.index(str(d))] if str(d) in out_labels else 1
    macs *= _valid_taps(length, outputs, size, pad_lo, stride, lhs_dilate, rhs_dilate)
  return 2 * macs


def _window(attrs: str, num_spatial: int) -> list[tuple]:
  """Per spatial dimension: (size, (pad_lo, pad_hi), stride, lhs_dilate, rhs_dilate)."""
  text = re.search(r"window=\{([^}]*)\}", attrs)
  fields = dict(re.findall(r"(\w+)=(\S+)", text[1])) if text else {}
  split = lambda key, default: (fields[key].split("x") if key in fields
                                else [default] * num_spatial)
  sizes = [int(v) for v in split("size", "1")]
  pads = [tuple(int(p) for p in v.split("_")) for v in split("pad", "0_0")]
  strides = [int(v) for v in split("stride", "1")]
  lhs_dilate = [int(v) for v in split("lhs_dilate", "1")]
  rhs_dilate = [int(v) for v in split("rhs_dilate", "1")]
  return list(zip(sizes, pads, strides, lhs_dilate, rhs_dilate))


def _valid_taps(length: int, outputs: int, size: int, pad_lo: int, stride: int,
                lhs_dilate: int, rhs_dilate: int) -> int:
  """Window taps, summed over output positions, that land on an input element (input
  position x = o * stride + k * rhs_dilate - pad_lo, a real element when 0 <= x < span and
  x is a multiple of lhs_dilate). O(outputs), whatever the window: weight gradients are
  convolutions with windows as long as the batch, some of them input-dilated."""
  span = (length - 1) * lhs_dilate + 1
  # x = start + k * rhs_dilate is a multiple of lhs_dilate exactly for k = k0 (mod period)
  # when g = gcd(rhs_dilate, lhs_dilate) divides start, for no k otherwise.
  g = math.gcd(rhs_dilate, lhs_dilate)
  period = lhs_dilate // g
  inverse = pow(rhs_dilate // g, -1, period)
  taps = 0
  for o in range(outputs):
    start = o * stride - pad_lo  # x at k = 0
    k_lo = max(0, -(start // rhs_dilate) if start < 0 else 0)  # first k with x >= 0
    k_hi = min(size - 1, (span - 1 - start) // rhs_dilate)  # last k with x < span
    if k_hi < k_lo or start % g:
      continue
    k0 = (-start // g) * inverse % period
    taps += (k_hi - k0) // period - (k_lo - 1 - k0) // period
  return taps


def trip_count(loop: Instruction, caller: list[Instruction],
               computations: dict[str, list[Instruction]]) -> int | None:
  """Iterations of a while loop, or None when it cannot be read from the HLO."""
  known = re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.attrs)
  if known:
    return int(known[1])
  condition = computations.get(re.search(r"condition=%([^\s,]+)", loop.attrs)[1], [])
  body = computations.get(re.search(r"body=%([^\s,]+)", loop.attrs)[1], [])
  by_name = {i.name: i for i in condition}
  root = next((i for i in condition if i.root), None)
  if root is None or root.opcode != "compare" or len(root.operands) != 2:
    return None
  direction = re.search(r"direction=(\w+)", root.attrs)[1]
  a, b = (by_name.get(n) for n in root.operands)
  if direction in ("GT", "GE"):
    a, b, direction = b, a, {"GT": "LT", "GE": "LE"}[direction]  # N > i  is  i < N
  if direction not in ("LT", "LE") or not (a and b and a.opcode == "get-tuple-element"
                                           and b.opcode == "constant"):
    return None
  index = int(re.search(r"index=(\d+)", a.attrs)[1])
  limit, start = b.literal, _tuple_element_constant(loop.operands[0], index, caller)
  step = _induction_step(body, index)
  if limit is None or start is None or not step:
    return None
  end = limit + (1 if direction == "LE" else 0)
  return max(0, -(-(end - start) // step))


def _induction_step(body: list[Instruction], index: int) -> int | None:
  """c when the loop body's ROOT tuple holds `gte(param, index) + c` at `index`."""
  by_name = {i.name: i for i in body}
  root = next((i for i in body if i.root), None)
  if root is None or root.opcode != "tuple" or index >= len(root.operands):
    return None
  update = _through_copies(by_name.get(root.operands[index]), by_name)
  if update is None or update.opcode != "add" or len(update.operands) != 2:
    return None
  x, c = (_through_copies(by_name.get(n), by_name) for n in update.operands)
  if c is not None and c.opcode == "get-tuple-element":
    x, c = c, x
  if not (x and c and x.opcode == "get-tuple-element" and c.opcode == "constant"
          and re.search(r"index=(\d+)", x.attrs)[1] == str(index)):
    return None
  return c.literal if c.literal and c.literal > 0 else None


def _tuple_element_constant(tuple_name: str, index: int,
                            caller: list[Instruction]) -> int | None:
  """The integer constant a while loop's initial tuple holds at `index`, if it is one."""
  by_name = {i.name: i for i in caller}
  tup = by_name.get(tuple_name)
  if tup is None or tup.opcode != "tuple" or index >= len(tup.operands):
    return None
  element = _through_copies(by_name.get(tup.operands[index]), by_name)
  return element.literal if element is not None else None


def _through_copies(instruction: Instruction | None,
                    by_name: dict[str, Instruction]) -> Instruction | None:
  while instruction is not None and instruction.opcode == "copy":
    instruction = by_name.get(instruction.operands[0])
  return instruction


def analyze(text: str) -> HloStats:
  computations, entry = parse_module(text)
  _read_literals(text, computations)
  edges = collections.defaultdict(list)  # caller -> [(callee, factor, while instruction)]
  loops = []
  for name, instructions in computations.items():
    for i in instructions:
      if i.opcode == "while":
        body = re.search(r"body=%([^\s,]+)", i.attrs)[1]
        trips = trip_count(i, instructions, computations)
        loops.append(dict(name=i.name, computation=name, trip_count=trips))
        edges[name].append((body, trips, i.name))
        continue
      if i.opcode in ("async-done", "async-update"):
        continue  # the async-start names the same computation
      for kind, callee in _CALLEE.findall(i.attrs):
        if kind not in ("to_apply", "condition"):
          edges[name].append((callee, 1, None))
      branches = _BRANCHES.search(i.attrs)
      if branches:
        edges[name] += [(b.strip().lstrip("%"), 1, None) for b in branches[1].split(",")]
  multiplicity, unknown = _multiplicities(entry, edges, computations)
  for loop in loops:
    loop["multiplicity"] = multiplicity.get(loop["computation"], 0)
  flops, collectives = 0, {k: Collective() for k in COLLECTIVES}
  for name, instructions in computations.items():
    m = multiplicity.get(name, 0)
    if not m:
      continue
    shapes = {i.name: i.shape for i in instructions}
    for i in instructions:
      flops += m * matmul_flops(i, shapes)
      kind = i.opcode[:-len("-done")] if i.opcode.endswith("-done") else i.opcode
      if kind in collectives and not i.opcode.endswith("-start"):
        c = collectives[kind]
        c.count += m
        c.bytes += m * shape_bytes(i.shape)
        if name in unknown:
          c.count_in_loops_of_unknown_trip_count += m
  return HloStats(matmul_flops=flops,
                  collectives={k: v for k, v in collectives.items() if v.count},
                  loops=loops, unknown_trip_counts=sum(l["trip_count"] is None for l in loops))


def _read_literals(text: str, computations: dict[str, list[Instruction]]) -> None:
  """Scalar integer constants: `%c = s32[] constant(12)` (the parser keeps no literals)."""
  values = {m[1]: int(m[2]) for m in re.finditer(
      r"%(\S+) = [su](?:8|16|32|64)\[\](?:\{[^}]*\})? constant\((-?\d+)\)", text)}
  for instructions in computations.values():
    for i in instructions:
      if i.opcode == "constant":
        i.literal = values.get(i.name)


def _multiplicities(entry: str, edges: dict, computations: dict) -> tuple[dict, set]:
  """Times each computation runs per execution of ENTRY (call graph in topological order),
  and the computations reached through a loop of unknown trip count."""
  indegree = collections.Counter()
  reachable, stack = {entry}, [entry]
  while stack:
    for callee, _, _ in edges.get(stack.pop(), []):
      if callee in computations:
        indegree[callee] += 1
        if callee not in reachable:
          reachable.add(callee)
          stack.append(callee)
  multiplicity = collections.Counter({entry: 1})
  unknown: set[str] = set()
  ready = [entry]
  while ready:
    name = ready.pop()
    for callee, factor, loop in edges.get(name, []):
      if callee not in computations:
        continue
      multiplicity[callee] += multiplicity[name] * (1 if factor is None else factor)
      if name in unknown or (loop is not None and factor is None):
        unknown.add(callee)
      indegree[callee] -= 1
      if indegree[callee] == 0:
        ready.append(callee)
  return dict(multiplicity), unknown
