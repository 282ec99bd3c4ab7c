"""The import graph of mmjax runs one way, config -> data/models -> objectives -> step ->
train/evaluate: no cycle, no upward import, no import tucked into a function to dodge one,
and the configs depend on nothing in mmjax."""
import ast
import pathlib

import pytest

from conftest import REPO

# Layers, lowest first; a module may import its own layer and the ones below.
LAYERS = (
    ("foundation", ("mmjax.errors", "mmjax.command", "mmjax.devices", "mmjax.coordination",
                    "mmjax.vocabulary", "mmjax.locks", "mmjax.sharding", "mmjax.interrupts",
                    "mmjax.watchdog", "mmjax.integrity", "mmjax.goodput", "mmjax.retry",
                    "mmjax.writers", "mmjax.checkpoint", "mmjax.local_checkpoint",
                    "mmjax.profiling", "mmjax.topologies",
                    "mmjax.hlo", "mmjax.param_groups", "mmjax.compiled")),
    ("data and models", ("mmjax.tokenizers", "mmjax.data", "mmjax.ingest", "mmjax.models",
                         "mmjax.decode")),
    ("objectives", ("mmjax.losses", "mmjax.objectives", "mmjax.optimizer", "mmjax.state")),
    ("step", ("mmjax.step", "mmjax.runtime", "mmjax.summary", "mmjax.warm_start")),
    ("evaluation", ("mmjax.evaluators",)),
    ("commands", ("mmjax.cli", "mmjax.train", "mmjax.evaluate", "mmjax.convert", "mmjax.export",
                  "mmjax.aot", "mmjax.inference", "mmjax.embed", "mmjax.interpolate")),
)


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in sorted(pathlib.Path(REPO, "mmjax").rglob("*.py")):
    parts = path.relative_to(REPO).with_suffix("").parts
    out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return out


MODULES = _modules()


def _rank(module: str) -> int:
  for rank, (_, prefixes) in enumerate(LAYERS):
    if any(module == p or module.startswith(p + ".") for p in prefixes):
      return rank
  raise AssertionError(f"{module} is in no layer of tests/test_architecture.py")


def _imports(path: pathlib.Path) -> tuple[set[str], set[str]]:
  """(mmjax modules imported at module level, ones imported inside functions). A top-level
  `try: import ... except ImportError` (a module of an optional extra) is module level."""
  top, nested = set(), set()
  tree = ast.parse(path.read_text())
  module_level = {id(n) for n in tree.body}
  module_level |= {id(n) for t in tree.body if isinstance(t, ast.Try) for n in t.body}
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES
               else node.module for a in node.names]
    names = {n for n in names if n in MODULES}
    (top if id(node) in module_level else nested).update(names)
  return top, nested


def test_every_module_is_in_a_layer_and_imports_only_down():
  upward = []
  for module, path in MODULES.items():
    top, _ = _imports(path)
    upward += [f"{module} ({LAYERS[_rank(module)][0]}) imports {dep} "
               f"({LAYERS[_rank(dep)][0]})" for dep in top if _rank(dep) > _rank(module)]
  assert not upward, "\n".join(upward)


def test_no_mmjax_import_inside_a_function():
  nested = {module: _imports(path)[1] for module, path in MODULES.items()}
  assert not {m: n for m, n in nested.items() if n}


def test_no_import_cycle():
  graph = {module: _imports(path)[0] - {module} for module, path in MODULES.items()}
  state = {}

  def visit(module, trail):
    if state.get(module) == "done":
      return
    assert state.get(module) != "open", " -> ".join(trail + [module])
    state[module] = "open"
    for dep in sorted(graph[module]):
      visit(dep, trail + [module])
    state[module] = "done"

  for module in graph:
    visit(module, [])


@pytest.mark.parametrize("path", sorted(pathlib.Path(REPO, "configs").glob("*.py")),
                         ids=lambda p: p.name)
def test_configs_import_nothing_from_mmjax(path):
  tree = ast.parse(path.read_text())
  modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
  modules |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
  assert not {m for m in modules if m.startswith("mmjax")}
