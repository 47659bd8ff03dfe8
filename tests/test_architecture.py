"""The package's layering: what users run never imports the measurement toolbox or the analysis tools.

`tools/`, `benchmarks/` and `scripts/` import `admin_jax`; the reverse would ship research code
in the product. Inside the package, `admin_jax/analysis/` (research figures) may use the core, and
the core may not use it.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / 'admin_jax'
TOOLBOXES = ('tools', 'benchmarks', 'scripts')


def _imported_modules(path: pathlib.Path) -> set[str]:
  """Absolute module names a file imports (`import a.b`, `from a.b import c` gives a.b and a.b.c)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names.add(node.module)
      names.update(f'{node.module}.{alias.name}' for alias in node.names)
  return names


def _is_under(module: str, package: str) -> bool:
  return module == package or module.startswith(package + '.')


def _offenders(paths, forbidden: tuple[str, ...], root: pathlib.Path = ROOT) -> dict[str, list[str]]:
  """{file: the forbidden modules it imports} for the files that import any."""
  found = {}
  for path in paths:
    bad = sorted(m for m in _imported_modules(path) if any(_is_under(m, f) for f in forbidden))
    if bad:
      found[str(path.relative_to(root))] = bad
  return found


def test_the_package_never_imports_the_toolbox():
  assert _offenders(PACKAGE.rglob('*.py'), TOOLBOXES) == {}


def test_core_modules_never_import_the_analysis_tools():
  core = [p for p in PACKAGE.rglob('*.py') if (PACKAGE / 'analysis') not in p.parents]
  assert len(core) > 20
  assert _offenders(core, ('admin_jax.analysis',)) == {}


def test_the_checks_see_an_offending_import(tmp_path):
  """The scanner itself: both kinds of import are found, relative imports are not mistaken."""
  bad = tmp_path / 'bad.py'
  bad.write_text('import benchmarks.traffic\nfrom admin_jax.analysis import probe\nfrom . import x\n')
  assert _offenders([bad], TOOLBOXES, tmp_path) == {'bad.py': ['benchmarks.traffic']}
  assert _offenders([bad], ('admin_jax.analysis',), tmp_path) == {
      'bad.py': ['admin_jax.analysis', 'admin_jax.analysis.probe']}
  assert 'x' not in _imported_modules(bad)
