"""The package's structure: import graph, method registry, adapter fields per family."""

from __future__ import annotations

import ast
import inspect
import warnings
from pathlib import Path

import pytest
import torch
from conftest import MODEL_FACTORIES, make_model

import captum_vit
from captum_vit import attr, registry
from captum_vit.cli import _method_choices, _method_names

PKG = Path(captum_vit.__file__).resolve().parent


# ------------------------------------------------------------------ import graph
def _module_name(path: Path) -> str:
    parts = ["captum_vit", *path.relative_to(PKG).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_pkg: bool, level: int, target: str | None) -> str:
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, target] if target else base)


def _import_graph() -> dict[str, set[str]]:
    """Module -> the captum_vit modules it imports (anywhere, also inside functions)."""
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, is_pkg, node.level, node.module) if node.level else (node.module or "")
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            for name in names:
                # the longest existing module named by the import
                while name and name not in files:
                    name = name.rpartition(".")[0]
                if name.startswith("captum_vit") and name != mod:
                    graph[mod].add(name)
    return graph


def test_import_graph_has_no_cycle() -> None:
    graph = _import_graph()
    # a package's __init__ importing its own submodules is the package, not a dependency
    deps = {m: {d for d in ds if not m.startswith(d + ".")} for m, ds in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(deps[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(d):], d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(deps):
        if m not in state:
            visit(m)


def test_graph_sees_function_level_and_relative_imports() -> None:
    graph = _import_graph()
    assert "captum_vit._capture" in graph["captum_vit.attr._common"]  # from .._capture
    assert "captum_vit.registry" in graph["captum_vit.evaluation"]


def test_attr_private_modules_stay_inside_attr() -> None:
    for mod, deps in _import_graph().items():
        if mod.startswith("captum_vit.attr"):
            continue
        bad = [d for d in deps if d.startswith("captum_vit.attr._")]
        assert not bad, f"{mod} imports {bad}"


#: Modules allowed to import a model family's library: the capture layer, the LRP rules
#: beside it, the model loader, and the speed benchmark (it builds timm models for peers).
_FAMILY_MODULES = {"captum_vit._capture", "captum_vit._lrp", "captum_vit.models", "captum_vit._speed"}


def test_only_the_family_layer_imports_timm_or_transformers() -> None:
    """CONTRIBUTING: no other module may test a model's class or family (DESIGN: nothing above
    the capture layer knows whether a model is timm or Hugging Face)."""
    for path in PKG.rglob("*.py"):
        mod = _module_name(path)
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            bad = [n for n in names if n.split(".")[0] in ("timm", "transformers")]
            assert not bad or mod in _FAMILY_MODULES, f"{mod} imports {bad}"


def test_masked_forward_is_public() -> None:
    from captum_vit._token_masking import masked_forward as old
    from captum_vit.masking import masked_forward

    assert masked_forward is old is captum_vit.masked_forward
    assert "masked_forward" in captum_vit.masking.__all__


# ------------------------------------------------------------------ registry
def test_every_attribution_class_is_reachable() -> None:
    classes = {n for n, c in inspect.getmembers(attr, inspect.isclass) if n in attr.__all__}
    reached = {e.cls for e in registry.METHODS.values() if e.cls is not None}
    assert classes <= reached
    assert set(registry.METHODS) <= set(_method_choices())


def test_names_and_aliases_unique() -> None:
    names = list(registry.METHODS)
    aliases = [a for e in registry.METHODS.values() for a in e.aliases]
    assert len(set(names)) == len(names)
    assert len(set(aliases)) == len(aliases) and not set(aliases) & set(names)


def test_aliases_warn_and_resolve(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.warns(DeprecationWarning, match="'chefer' is deprecated"):
        assert registry.resolve_name("chefer") == "grad_rollout_chefer"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert registry.resolve_name("rollout_mean") == "rollout_mean"
    assert _method_names(["raw", "raw_attention"]) == ["raw_attention"]
    assert "'raw' is deprecated" in capsys.readouterr().err
    with pytest.raises(KeyError, match="unknown method"):
        registry.resolve_name("nope")


def test_evaluation_reexports_the_registry() -> None:
    from captum_vit import evaluation

    assert evaluation.register_method is registry.register_method
    assert evaluation.available_methods() == registry.available_methods()


def test_entries_take_options_by_name() -> None:
    model, size = make_model("timm_vit")
    adapter = captum_vit.adapt(model)
    x = torch.randn(1, 3, size, size)
    t = torch.zeros(1, dtype=torch.long)
    idx = torch.zeros(1, dtype=torch.long)
    entry = registry.METHODS["rollout_max"]
    got = entry.build(model, adapter, {"rollout_max_discard_ratio": 0.5})(x, t, idx)
    want = attr.AttentionRollout(model, head_fusion="max", discard_ratio=0.5).attribute(
        x, return_patch_grid=True
    )
    torch.testing.assert_close(got, want)
    occ = registry.METHODS["patch_occlusion"].build(model, adapter, {"occlusion_window": 2})
    want = attr.PatchOcclusion(model).attribute(x, target=t, window=2, return_patch_grid=True)
    torch.testing.assert_close(occ(x, t, idx), want)


# ------------------------------------------------------------------ adapter fields
_EXPECTED_ROTARY = {"timm_eva"}


@pytest.mark.parametrize("name", sorted(MODEL_FACTORIES))
def test_adapter_family_fields(name: str) -> None:
    model, size = make_model(name)
    adapter = captum_vit.adapt(model)
    assert (adapter.rotary is not None) == (name in _EXPECTED_ROTARY)
    assert adapter.droppable == (name not in _EXPECTED_ROTARY)
    path = adapter.pooling_path
    if path is None:
        assert adapter.pooling_path_error
        return
    seen: list[torch.Tensor] = []
    handle = path.module.register_forward_hook(lambda _m, _a, out: seen.append(path.read(out)))
    try:
        with torch.no_grad():
            adapter.forward(torch.randn(1, 3, size, size))
    finally:
        handle.remove()
    assert seen and seen[-1].ndim == 3
    with torch.no_grad():
        scores = path.cls_head(seen[-1])
    assert scores.shape[0] == 1


def test_custom_adapter_fields() -> None:
    model, _ = make_model("timm_vit")
    modules = [b.attn for b in model.blocks]  # type: ignore[union-attr]
    custom = captum_vit.adapt(model, attention_modules=modules, patch_size=16, rotary="MyRope")
    assert not custom.droppable and custom.pooling_path is None and custom.pooling_path_error
    assert captum_vit.adapt(model, rotary="").droppable


@pytest.mark.slow
def test_every_entry_runs_with_cli_options() -> None:
    """Each registry entry takes the command line's option mapping and gives a patch grid."""
    model, size = make_model("timm_vit")
    adapter = captum_vit.adapt(model)
    x = torch.randn(2, 3, size, size)
    grid = adapter.grid_size(x)
    options = {"layer": -1, "discard_ratio": 0.0, "window": 1, "perturbations_per_eval": 4,
               "show_progress": False, "gamma": 1.0, "unnormalize": ((0.5,) * 3, (0.5,) * 3)}
    t = torch.tensor([0, 1])
    for entry in registry._BUILTIN:  # other tests may register their own methods
        out = entry.build(model, adapter, options)(x, t, torch.arange(2))
        assert out.shape == (2, 1, *grid), entry.name
        assert torch.isfinite(out).all(), entry.name
