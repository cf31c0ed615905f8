"""Edits of a parsed JSON file for bad-input tests."""

DELETE = object()   # set_at(path, DELETE) removes the field


def set_at(path: tuple, value):
  """A function that sets (or, with DELETE, removes) the field at `path` (keys and list indices)
  of the JSON object it is given, in place."""
  def change(gt):
    obj = gt
    for key in path[:-1]:
      obj = obj[key]
    if value is DELETE:
      del obj[path[-1]]
    else:
      obj[path[-1]] = value
  return change
