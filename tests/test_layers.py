"""The layers: worldmodels/ and envs/ import nothing of agents/, bench/ or each other; agents/
imports both; bench/ and the CLI (agents/cli.py) sit on top. Read from the source with `ast`, every
import counted, those inside functions too, so a change cannot quietly break the rule."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("worldmodels", "envs", "agents", "bench")
# what each package may import of the others
ALLOWED = {"worldmodels": set(), "envs": set(), "agents": {"worldmodels", "envs"},
           "bench": {"worldmodels", "envs", "agents"}}
TOP = {"agents/cli.py"}  # the command line: may reach every package


def imports(path: Path) -> set[str]:
    """The project packages a file imports (absolute imports; the project uses no relative ones)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        else:
            continue
        found |= {n.split(".")[0] for n in names if n.split(".")[0] in PACKAGES}
    return found


def test_no_package_imports_a_layer_above_or_beside_it():
    broken = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            if rel in TOP:
                continue
            for other in imports(path) - {pkg} - ALLOWED[pkg]:
                broken.append(f"{rel} imports {other}")
    assert not broken, "layer rule broken: " + "; ".join(broken)


def test_the_rule_catches_a_break(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("def f():\n    from agents.train import train\n    import bench.update\n")
    assert imports(bad) == {"agents", "bench"}


def test_import_envs_loads_no_model_code():
    """`import envs` (after torchrl, which loads its own dependencies) brings in no world model, no
    agent code and no Triton of ours."""
    code = ("import sys, torchrl; before = set(sys.modules); import envs; "
            "new = sorted(m for m in set(sys.modules) - before if m.split('.')[0] in "
            "('worldmodels', 'agents', 'bench', 'triton')); print(new); assert not new")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-500:]


def _module_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports at module level (the imports that run on import)."""
    graph = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            mod = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            deps = set()
            for node in ast.parse(path.read_text()).body:
                if isinstance(node, ast.Import):
                    deps |= {a.name for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    deps |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            graph[mod] = {d for d in deps if d.split(".")[0] in PACKAGES}
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def test_no_import_cycles():
    graph, state, cycles = _module_graph(), {}, []

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(cycles)
