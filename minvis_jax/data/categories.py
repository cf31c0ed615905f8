"""Category tables of the standard datasets, and their check against an annotation file.

A table lists (dataset category id, name) in class-index order (ascending ids): class index i of a
model trained on the dataset is the table's i-th entry. The ids and names are those of the official
annotation files (YouTube-VIS 2019 / 2021, OVIS, COCO 2017 instances), spelling included (OVIS's
'Vehical'); YouTube-VIS 2022 uses the 2021 categories.
"""

from typing import Sequence

# The generated videos of data/synthetic.py: one shape (and texture) per category.
SYNTHETIC = ((1, 'disc'), (2, 'square'), (3, 'triangle'), (4, 'cross'))

YTVIS_2019 = tuple(enumerate((
    'person', 'giant_panda', 'lizard', 'parrot', 'skateboard', 'sedan', 'ape', 'dog', 'snake',
    'monkey', 'hand', 'rabbit', 'duck', 'cat', 'cow', 'fish', 'train', 'horse', 'turtle', 'bear',
    'motorbike', 'giraffe', 'leopard', 'fox', 'deer', 'owl', 'surfboard', 'airplane', 'truck',
    'zebra', 'tiger', 'elephant', 'snowboard', 'boat', 'shark', 'mouse', 'frog', 'eagle',
    'earless_seal', 'tennis_racket'), start=1))

YTVIS_2021 = tuple(enumerate((
    'airplane', 'bear', 'bird', 'boat', 'car', 'cat', 'cow', 'deer', 'dog', 'duck', 'earless_seal',
    'elephant', 'fish', 'flying_disc', 'fox', 'frog', 'giant_panda', 'giraffe', 'horse', 'leopard',
    'lizard', 'monkey', 'motorbike', 'mouse', 'parrot', 'person', 'rabbit', 'shark', 'skateboard',
    'snake', 'snowboard', 'squirrel', 'surfboard', 'tennis_racket', 'tiger', 'train', 'truck',
    'turtle', 'whale', 'zebra'), start=1))

OVIS = tuple(enumerate((
    'Person', 'Bird', 'Cat', 'Dog', 'Horse', 'Sheep', 'Cow', 'Elephant', 'Bear', 'Zebra', 'Giraffe',
    'Poultry', 'Giant_panda', 'Lizard', 'Parrot', 'Monkey', 'Rabbit', 'Tiger', 'Fish', 'Turtle',
    'Bicycle', 'Motorcycle', 'Airplane', 'Boat', 'Vehical'), start=1))

# COCO 2017 instances: 80 classes over ids 1..90 (ids of dropped classes are skipped).
COCO = (
    (1, 'person'), (2, 'bicycle'), (3, 'car'), (4, 'motorcycle'), (5, 'airplane'), (6, 'bus'),
    (7, 'train'), (8, 'truck'), (9, 'boat'), (10, 'traffic light'), (11, 'fire hydrant'),
    (13, 'stop sign'), (14, 'parking meter'), (15, 'bench'), (16, 'bird'), (17, 'cat'), (18, 'dog'),
    (19, 'horse'), (20, 'sheep'), (21, 'cow'), (22, 'elephant'), (23, 'bear'), (24, 'zebra'),
    (25, 'giraffe'), (27, 'backpack'), (28, 'umbrella'), (31, 'handbag'), (32, 'tie'),
    (33, 'suitcase'), (34, 'frisbee'), (35, 'skis'), (36, 'snowboard'), (37, 'sports ball'),
    (38, 'kite'), (39, 'baseball bat'), (40, 'baseball glove'), (41, 'skateboard'),
    (42, 'surfboard'), (43, 'tennis racket'), (44, 'bottle'), (46, 'wine glass'), (47, 'cup'),
    (48, 'fork'), (49, 'knife'), (50, 'spoon'), (51, 'bowl'), (52, 'banana'), (53, 'apple'),
    (54, 'sandwich'), (55, 'orange'), (56, 'broccoli'), (57, 'carrot'), (58, 'hot dog'),
    (59, 'pizza'), (60, 'donut'), (61, 'cake'), (62, 'chair'), (63, 'couch'), (64, 'potted plant'),
    (65, 'bed'), (67, 'dining table'), (70, 'toilet'), (72, 'tv'), (73, 'laptop'), (74, 'mouse'),
    (75, 'remote'), (76, 'keyboard'), (77, 'cell phone'), (78, 'microwave'), (79, 'oven'),
    (80, 'toaster'), (81, 'sink'), (82, 'refrigerator'), (84, 'book'), (85, 'clock'), (86, 'vase'),
    (87, 'scissors'), (88, 'teddy bear'), (89, 'hair drier'), (90, 'toothbrush'))

TABLES = {
    'synthetic': SYNTHETIC,
    'ytvis_2019': YTVIS_2019,
    'ytvis_2021': YTVIS_2021,
    'ytvis_2022': YTVIS_2021,
    'ovis': OVIS,
    'coco': COCO,
}


def table(dataset: str) -> tuple[tuple[int, ...], tuple[str, ...]]:
  """(category ids, names) of a dataset in class-index order."""
  if dataset not in TABLES:
    raise ValueError(f'no category table for dataset {dataset!r}; known: {sorted(TABLES)}')
  ids, names = zip(*TABLES[dataset])
  return tuple(ids), tuple(names)


def find(names: Sequence[str]) -> str | None:
  """The dataset whose table has exactly these class names in this order, or None."""
  key = tuple(str(n).lower() for n in names)
  for dataset, entries in TABLES.items():
    if tuple(n.lower() for _, n in entries) == key:
      return dataset
  return None


def check(data_config, source, where: str = ''):
  """Checks the config's `data.category_ids` / `category_names` against the categories a reader
  found in the annotation file (`source.category_ids` / `category_names`); returns `source`.

  An empty table in the config (a custom dataset) accepts any categories. A mismatch raises
  ValueError naming the file and the first differing class.
  """
  ids = tuple(data_config.get('category_ids', None) or ())
  names = tuple(data_config.get('category_names', None) or ())
  where = where or getattr(source, 'json_path', '') or getattr(source, 'name', 'dataset')
  fix = ('; point data.manual_dir at that dataset, or set data.category_ids and '
         'data.category_names to the file\'s (empty: take them from the file)')
  dataset = data_config.get('dataset', '?')
  got_ids, got_names = tuple(source.category_ids), tuple(source.category_names)
  if ids and ids != got_ids:
    if len(ids) != len(got_ids):
      raise ValueError(f'{where}: {len(got_ids)} categories, the config\'s {dataset} table has '
                       f'{len(ids)}{fix}')
    i = next(i for i, (a, b) in enumerate(zip(ids, got_ids)) if a != b)
    raise ValueError(f'{where}: class {i} has category id {got_ids[i]}, the config\'s {dataset} '
                     f'table says {ids[i]}{fix}')
  if names and names != got_names:
    if len(names) != len(got_names):
      raise ValueError(f'{where}: {len(got_names)} categories, the config\'s {dataset} table has '
                       f'{len(names)}{fix}')
    i = next(i for i, (a, b) in enumerate(zip(names, got_names)) if a != b)
    raise ValueError(f'{where}: category id {got_ids[i]} is named {got_names[i]!r}, the config\'s '
                     f'{dataset} table says {names[i]!r}{fix}')
  return source


def of_config(config) -> tuple[list[int], list[str]]:
  """(dataset category id, name) of class index 0..K-1: the config's if it has them
  (data.category_ids/category_names), else 1..K."""
  k = config.model.num_classes
  data = config.get('data', {}) or {}
  ids = list(data.get('category_ids', None) or range(1, k + 1))
  names = list(data.get('category_names', None) or [f'class {i}' for i in ids])
  if len(ids) != k or len(names) != k:
    raise ValueError(f'config: data.category_ids/category_names have {len(ids)}/{len(names)} '
                     f'entries for model.num_classes={k}')
  return ids, names
