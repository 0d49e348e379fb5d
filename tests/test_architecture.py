"""The package's shape: its imports form no cycle (lazy imports count), the low layers import only what their
docstrings allow, and every fused operator is registered once with a reference, a fake, its autograd formula and
an opcheck test for each of its twins."""
import ast
from pathlib import Path

import pytest
import torch

from ltdd_fast import ops

PACKAGE = Path(__file__).resolve().parents[1] / "ltdd_fast"
TESTS = Path(__file__).resolve().parent

# what the lowest layers may import from ltdd_fast (each names its rule in its docstring)
ALLOWED = {
    "ltdd_fast.errors": set(),
    "ltdd_fast.dam": set(),
    "ltdd_fast.dsa_chain": set(),
    "ltdd_fast.phases": set(),
    "ltdd_fast.checks": {"ltdd_fast.errors"},
    "ltdd_fast.files": {"ltdd_fast.errors"},
    "ltdd_fast.distributed": {"ltdd_fast.errors"},
    "ltdd_fast.kernels": {"ltdd_fast.kernels"},
    "ltdd_fast.ops": {"ltdd_fast.ops", "ltdd_fast.kernels", "ltdd_fast._C", "ltdd_fast.dam", "ltdd_fast.dsa_chain"},
}


def _modules():
    """{dotted name: path} of every module of the package."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph():
    """{module: {ltdd_fast modules it imports, at the top or inside a function}}; a name imported from a package
    counts as its submodule where one exists. A package's import of its own parent (implied by Python) is left
    out: it is not written in the code."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    prefix = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                targets = [f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in modules
                           or f"{prefix}.{alias.name}" == "ltdd_fast._C" else prefix for alias in node.names]
            else:
                continue
            found.update(t for t in targets if t.split(".")[0] == "ltdd_fast" and t != name)
        graph[name] = found
    return graph


def cycles(graph):
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    # ops.norm_pool imports the Triton kernel inside a function, relative to its package
    assert "ltdd_fast.kernels.norm_relu_pool" in graph["ltdd_fast.ops.norm_pool"]
    assert "ltdd_fast.ops.dispatch" in graph["ltdd_fast.ops.sgd_step"]


def test_low_layers_import_only_what_they_may():
    graph = import_graph()
    for name, imports in graph.items():
        rule = next((ALLOWED[p] for p in sorted(ALLOWED, key=len, reverse=True)
                     if name == p or name.startswith(p + ".")), None)
        if rule is None:
            continue
        stray = {i for i in imports if not any(i == a or i.startswith(a + ".") for a in rule)}
        assert not stray, f"{name} imports {sorted(stray)}; it may import only {sorted(rule)}"


def _opchecked():
    """{(namespace, op name)} that some test passes to torch.library.opcheck, directly or through a name."""
    found = set()

    def op_of(node, names):
        if isinstance(node, ast.Name):
            return names.get(node.id)
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if isinstance(node, ast.Name):
            parts.append(node.id)
        parts.reverse()
        if parts[:2] == ["torch", "ops"] and len(parts) >= 4:
            return parts[2], parts[3]
        return None

    for path in TESTS.glob("test_*.py"):
        tree = ast.parse(path.read_text(), str(path))
        names = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                op = op_of(node.value, {})
                if op:
                    names[node.targets[0].id] = op
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "opcheck" and node.args):
                op = op_of(node.args[0], names)
                if op:
                    found.add(op)
    return found


def _registered_in(namespace):
    return {name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names()
            if name.startswith(namespace + "::")}


def test_every_operator_has_reference_fake_autograd_and_opcheck():
    checked = _opchecked()
    twins = []
    for name, op in ops.OPERATORS.items():
        assert callable(op.reference) and callable(op.fake), name
        if op.native and ops.NATIVE_AVAILABLE:
            twins.append(("ltdd_fast", name, op))
        if op.triton is not None:
            twins.append(("ltdd_triton", name, op))
    assert twins
    for namespace, name, op in twins:
        qualname = f"{namespace}::{name}"
        entry = torch._library.simple_registry.singleton.find(qualname)
        assert entry.fake_impl.kernel is not None, f"{qualname} has no fake kernel"
        if namespace == "ltdd_triton":  # a custom_op always has an autograd kernel; it holds the formula, if any
            differentiable = torch._library.custom_ops.OPDEFS[qualname]._backward_fn is not None
        else:
            differentiable = torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Autograd")
        assert differentiable == (op.autograd is not None), f"{qualname}: autograd registered {differentiable}"
        assert (namespace, name) in checked, f"no test runs torch.library.opcheck on torch.ops.{namespace}.{name}"


def test_every_library_operator_is_registered_here():
    # the native library defines no operator that ltdd_fast.ops does not know, and ltdd_triton holds only ours
    if ops.NATIVE_AVAILABLE:
        assert _registered_in("ltdd_fast") == {n for n, op in ops.OPERATORS.items() if op.native}
    assert _registered_in("ltdd_triton") == {n for n, op in ops.OPERATORS.items() if op.triton is not None}


def test_an_operator_registers_once():
    op = ops.OPERATORS["class_grad_stats"]
    with pytest.raises(RuntimeError, match="registered twice"):
        ops.dispatch.register(op)


def test_triton_twin_takes_the_native_schema():
    for name, op in ops.OPERATORS.items():
        if op.triton is None:
            continue
        schema = str(getattr(torch.ops.ltdd_triton, name).default._schema)
        assert schema == "ltdd_triton::" + op.schema
        if op.native and ops.NATIVE_AVAILABLE:
            assert str(getattr(torch.ops.ltdd_fast, name).default._schema) == "ltdd_fast::" + op.schema
