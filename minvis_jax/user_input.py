"""Checks of values a user hands over, applied where they enter: flag values, JSON text, paths
listed in a dataset file. Each raises ValueError (or FileNotFoundError) with a one-line message;
the flag parsers' messages leave the flag's name to the caller (argparse prefixes it)."""

import collections
import json
import math
import os
import posixpath

from minvis_jax import paths


# --- flag values (cli.py wraps these as argparse types) ----------------------------------------


def _parse(text: str, kind: type, expected: str):
  try:
    x = kind(text)
  except (TypeError, ValueError):
    raise ValueError(f'expected {expected}, got {text!r}') from None
  if kind is float and not math.isfinite(x):
    raise ValueError(f'expected {expected} (finite), got {text!r}')
  return x


def _ranged(name: str, kind: type, expected: str, ok):
  def parse(text: str):
    x = _parse(text, kind, expected)
    if not ok(x):
      raise ValueError(f'expected {expected}, got {text!r}')
    return x
  parse.__name__ = name
  return parse


positive_int = _ranged('positive_int', int, 'an integer >= 1', lambda x: x >= 1)
nonneg_int = _ranged('nonneg_int', int, 'an integer >= 0', lambda x: x >= 0)
positive_float = _ranged('positive_float', float, 'a number > 0', lambda x: x > 0)
nonneg_float = _ranged('nonneg_float', float, 'a number >= 0', lambda x: x >= 0)
finite_float = _ranged('finite_float', float, 'a finite number', lambda x: True)
probability = _ranged('probability', float, 'a number in [0, 1]', lambda x: 0 <= x <= 1)


def unmet_needs(needs, values: dict) -> str:
  """'--a applies only with --b' for the first (flag, needed flag) of `needs` whose flag has a
  value in `values` (parsed flags by name) while the needed one has none; '' when all are met."""
  for flag, needed in needs:
    if values.get(flag.lstrip('-')) not in (None, '', False) and not values.get(needed.lstrip('-')):
      return f'{flag} applies only with {needed}'
  return ''


# --- JSON --------------------------------------------------------------------------------------


def _no_duplicate_keys(name: str):
  def hook(pairs):
    seen = collections.Counter(k for k, _ in pairs)
    twice = [k for k, n in seen.items() if n > 1]
    if twice:
      # json keeps the last of two equal keys without a word: a merged or hand-edited file.
      raise ValueError(f'{name}: key {twice[0]!r} appears {seen[twice[0]]} times in one object '
                       '(JSON keeps only the last)')
    return dict(pairs)
  return hook


def parse_json(data: bytes | str, name: str, what: str = 'data'):
  """The parsed JSON of `data` (the content of file `name`), strictly: UTF-8, no duplicate key in
  an object; every failure is one ValueError naming `name`."""
  try:
    text = data.decode('utf-8') if isinstance(data, (bytes, bytearray)) else data
  except UnicodeDecodeError as e:
    raise ValueError(f'{name}: not a JSON {what} file: not UTF-8 text (byte {e.start}: '
                     f'{e.reason})') from None
  try:
    return json.loads(text, object_pairs_hook=_no_duplicate_keys(name))
  except json.JSONDecodeError as e:
    raise ValueError(f'{name}: not a JSON {what} file (malformed JSON: {e})') from None
  except RecursionError:
    raise ValueError(f'{name}: not a JSON {what} file: nested too deeply to parse') from None


def read_json(path: str, what: str = 'data'):
  """parse_json of the file `path`; FileNotFoundError names it when it is missing."""
  if not paths.isfile(path):
    raise FileNotFoundError(f'{path}: {what} file not found')
  with paths.open(path, 'rb') as f:
    return parse_json(f.read(), path, what)


# --- outputs ----------------------------------------------------------------------------------


def check_output_dir(path: str, flag: str) -> None:
  """The output directory `path` (of `flag`) exists, or is made, and is a writable directory:
  checked before the work, so a bad output path never costs a run."""
  if paths.exists(path) and not paths.isdir(path):
    raise ValueError(f'{path}: {flag} exists and is not a directory')
  paths.makedirs(path)
  if not paths.is_remote(path) and not os.access(path, os.W_OK | os.X_OK):
    raise PermissionError(f'{path}: {flag} is not writable')


# --- paths listed in a dataset file ------------------------------------------------------------


def path_under(root: str, relative: str, where: str) -> str:
  """`root`/`relative`, refused (ValueError naming `where`) when it leaves `root`: an absolute
  path, or `..` reaching above it. Judged on the text, not on symlinks: a link inside the root may
  point anywhere (datasets are often assembled from links), a listed path may not."""
  # On the relative text alone, so a URL root (gs://bucket/data) is judged like a local one.
  normal = posixpath.normpath(relative.replace(os.sep, '/'))
  if (posixpath.isabs(normal) or paths.scheme(relative) or normal == '..'
      or normal.startswith('../')):
    raise ValueError(f'{where}: path {relative!r} leaves the dataset root {root}')
  return paths.join(root, normal)
