"""The package's layering, read from the source with `ast`: every import of a project module sits
at the top of its file, argument parsing lives in cli.py, commands do not import each other."""

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'minvis_jax')

# Optional or heavy dependencies that may be imported where they are used (the only lazy imports).
LAZY_OK = ('torch', 'safetensors', 'tensorboardX', 'matplotlib', 'imageio', 'imageio_ffmpeg',
           'google')
# Modules that are a command's body only: nothing but cli.py imports them.
COMMAND_MODULES = ('minvis_jax.infer', 'minvis_jax.demo')


def _modules():
  for folder, _, files in os.walk(PACKAGE):
    for f in sorted(files):
      if f.endswith('.py'):
        path = os.path.join(folder, f)
        rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, '.')
        yield rel.removesuffix('.__init__'), path


MODULES = dict(_modules())


def _imported(node) -> list[str]:
  if isinstance(node, ast.Import):
    return [a.name for a in node.names]
  if node.level:   # relative: a project module
    return ['minvis_jax.' + (node.module or '')]
  return [node.module or ''] + [f'{node.module}.{a.name}' for a in node.names]


def _is_main_block(node) -> bool:
  """`if __name__ == '__main__':`"""
  test = node.test if isinstance(node, ast.If) else None
  return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
          and test.left.id == '__name__' and isinstance(test.comparators[0], ast.Constant)
          and test.comparators[0].value == '__main__')


def _imports(path, skip_main_block: bool = False):
  """(line, imported names, inside a function?) of every import statement of a file; with
  skip_main_block, not those under `if __name__ == '__main__':` (a `python -m` forward)."""
  tree = ast.parse(open(path).read(), path)
  nested, skipped = set(), set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      nested.update(id(n) for n in ast.walk(node) if n is not node)
    if skip_main_block and _is_main_block(node):
      skipped.update(id(n) for n in ast.walk(node))
  return [(n.lineno, _imported(n), id(n) in nested) for n in ast.walk(tree)
          if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in skipped]


def test_the_walk_sees_the_package():
  assert {'minvis_jax.cli', 'minvis_jax.train', 'minvis_jax.models.mask2former'} <= set(MODULES)


@pytest.mark.parametrize('module', sorted(MODULES))
def test_function_level_imports_are_only_optional_heavy_dependencies(module):
  bad = [f'{module}:{line} imports {names[0]}' for line, names, nested in _imports(MODULES[module])
         if nested and names[0].split('.')[0] not in LAZY_OK]
  assert not bad, bad


@pytest.mark.parametrize('module', sorted(MODULES))
def test_no_private_jax_and_argparse_only_in_cli(module):
  names = [n for _, names, _ in _imports(MODULES[module]) for n in names]
  assert not [n for n in names if n.startswith('jax._src')]
  if module not in ('minvis_jax.cli', 'minvis_jax.flags'):   # the commands and their flag types
    assert 'argparse' not in names


def test_commands_do_not_import_commands():
  """Only cli.py imports the command modules; nothing imports cli.py but `python -m` forwards."""
  for module, path in MODULES.items():
    if module == 'minvis_jax.cli' or module.endswith('__main__'):
      continue
    names = {n for _, names, _ in _imports(path, skip_main_block=True) for n in names}
    assert not names & set(COMMAND_MODULES), (module, names & set(COMMAND_MODULES))
    assert 'minvis_jax.cli' not in names, module


def test_the_checks_catch_a_function_level_project_import(tmp_path):
  path = tmp_path / 'm.py'
  path.write_text('import os\n\ndef f():\n  from minvis_jax import train\n  import torch\n\n'
                  "if __name__ == '__main__':\n  from minvis_jax import cli\n")
  found = [(line, names[0], nested) for line, names, nested in _imports(path)]
  assert found == [(1, 'os', False), (4, 'minvis_jax', True), (5, 'torch', True),
                   (8, 'minvis_jax', False)]
  assert [line for line, _, _ in _imports(path, skip_main_block=True)] == [1, 4, 5]


# File-system calls that take a path: outside paths.py they would bypass the path layer (a gs:// URL
# would become a local folder named `gs:`).
FS_CALLS = {'open', 'os.path', 'os.makedirs', 'os.mkdir', 'os.listdir', 'os.scandir', 'os.replace',
            'os.rename', 'os.remove', 'os.unlink', 'os.stat', 'shutil', 'glob', 'pathlib'}
# Modules whose file-system calls never see a user's data path, and why.
FS_EXEMPT = {
    'minvis_jax.paths': 'the path layer itself',
    'minvis_jax.config_lib': 'config files are Python modules imported from a local folder',
    'minvis_jax.host_memory': "the host's own /proc and /dev files",
    'minvis_jax.video_io': '--video is decoded by ffmpeg / Pillow from a local file or folder',
    'minvis_jax.workdir_lock': 'flock needs a local file (a URL work directory goes through the '
                               'path layer: paths.create_exclusive)',
}


def _fs_calls(path) -> list[tuple[int, str]]:
  """(line, dotted callee) of every call of FS_CALLS in a file."""
  def dotted(node):
    parts = []
    while isinstance(node, ast.Attribute):
      parts.append(node.attr)
      node = node.value
    return '.'.join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else ''
  found = []
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.Call):
      name = dotted(node.func)
      if any(name == c or name.startswith(c + '.') for c in FS_CALLS):
        found.append((node.lineno, name))
  return found


@pytest.mark.parametrize('module', sorted(set(MODULES) - set(FS_EXEMPT)))
def test_user_paths_go_through_the_path_layer(module):
  bad = [f'{module}:{line} calls {name} (use minvis_jax.paths)'
         for line, name in _fs_calls(MODULES[module])]
  assert not bad, bad


def test_the_path_layer_check_catches_a_direct_call(tmp_path):
  path = tmp_path / 'm.py'
  path.write_text('import os\nfrom PIL import Image\n\ndef f(p):\n  os.makedirs(p)\n'
                  '  Image.open(p)\n  with open(os.path.join(p, "x")) as f:\n    return f\n')
  assert _fs_calls(path) == [(5, 'os.makedirs'), (7, 'open'), (7, 'os.path.join')]
