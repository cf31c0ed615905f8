"""Category tables of the datasets: contents, configs, and the load-time check against the JSONs."""

import json
import os

import pytest

from support import layouts
from minvis_jax import config_lib
from minvis_jax.data import categories
from minvis_jax.data import input_pipeline
from minvis_jax.data import synthetic
from minvis_jax.data import ytvis


@pytest.mark.parametrize('dataset,count', [('ytvis_2019', 40), ('ytvis_2021', 40),
                                           ('ytvis_2022', 40), ('ovis', 25), ('coco', 80),
                                           ('synthetic', 4)])
def test_tables_are_sorted_unique_and_sized(dataset, count):
  ids, names = categories.table(dataset)
  assert len(ids) == len(names) == count
  assert list(ids) == sorted(set(ids)) and len(set(names)) == count


def test_table_facts_from_the_official_files():
  """Entries typed in from the official annotation files (not from the module)."""
  y19 = dict(zip(*categories.table('ytvis_2019')))
  assert (y19[1], y19[2], y19[21], y19[39], y19[40]) == (
      'person', 'giant_panda', 'motorbike', 'earless_seal', 'tennis_racket')
  y21 = dict(zip(*categories.table('ytvis_2021')))
  assert (y21[1], y21[5], y21[14], y21[26], y21[39]) == (
      'airplane', 'car', 'flying_disc', 'person', 'whale')
  assert categories.table('ytvis_2022') == categories.table('ytvis_2021')
  ovis = dict(zip(*categories.table('ovis')))
  assert (ovis[1], ovis[12], ovis[13], ovis[22], ovis[25]) == (
      'Person', 'Poultry', 'Giant_panda', 'Motorcycle', 'Vehical')
  coco_ids, coco_names = categories.table('coco')
  coco = dict(zip(coco_ids, coco_names))
  assert {12, 26, 29, 30, 45, 66, 68, 69, 71, 83} & set(coco_ids) == set()   # the dropped ids
  assert (coco[1], coco[13], coco[64], coco[72], coco[89], coco[90]) == (
      'person', 'stop sign', 'potted plant', 'tv', 'hair drier', 'toothbrush')
  # Contiguous class index i is the i-th smallest id (what the readers and the original do).
  assert coco_ids.index(90) == 79 and coco_ids.index(27) == 24


@pytest.mark.parametrize('spec,dataset', [('minvis', 'ytvis_2019'),
                                          ('minvis:dataset=ytvis_2021', 'ytvis_2021'),
                                          ('minvis:dataset=ovis', 'ovis'), ('coco', 'coco'),
                                          ('tiny', 'synthetic')])
def test_configs_carry_their_dataset_table(spec, dataset):
  c = config_lib.load_config(spec)
  assert c.data.dataset == dataset
  assert (tuple(c.data.category_ids), tuple(c.data.category_names)) == categories.table(dataset)
  assert len(c.data.category_ids) == c.model.num_classes


def test_find_names_a_dataset_by_its_class_names():
  assert categories.find([n.upper() for n in categories.table('ovis')[1]]) == 'ovis'
  assert categories.find(categories.table('coco')[1]) == 'coco'
  assert categories.find(list(categories.table('coco')[1])[::-1]) is None
  assert categories.find(['LABEL_0', 'LABEL_1']) is None


def test_synthetic_generator_json_passes_the_tiny_config(tmp_path):
  synthetic.generate(str(tmp_path), 'train', 2, 2, height=32, width=48, seed=0)
  c = config_lib.load_config('tiny')
  ds = ytvis.load_split('synthetic', str(tmp_path), 'train')
  assert categories.check(c.data, ds) is ds
  # The same file under a ytvis_2019 config is the wrong dataset: an error naming the file.
  c19 = config_lib.load_config('minvis')
  with pytest.raises(ValueError, match=r'train\.json: 4 categories, the config\'s ytvis_2019 '
                                       r'table has 40'):
    categories.check(c19.data, ds)
  # An empty table (a custom dataset) accepts the file's categories.
  c19.data.category_ids, c19.data.category_names = (), ()
  assert categories.check(c19.data, ds) is ds


def _official_json(path, dataset, names_override=None, reverse=False):
  """An annotation file in `dataset`'s official layout, categories written as the originals are
  ({'supercategory', 'id', 'name'}), one 1-frame video / image and one annotation."""
  ids, names = categories.table(dataset)
  names = list(names)
  for i, name in (names_override or {}).items():
    names[ids.index(i)] = name
  cats = [{'supercategory': 'object', 'id': i, 'name': n} for i, n in zip(ids, names)]
  if reverse:
    cats = cats[::-1]
  rle = {'size': [4, 6], 'counts': [4, 2, 18]}
  if dataset == 'coco':
    data = {'images': [{'id': 7, 'file_name': '000000000007.jpg', 'height': 4, 'width': 6}],
            'annotations': [{'id': 1, 'image_id': 7, 'category_id': ids[-1], 'iscrowd': 0,
                             'segmentation': [[0, 0, 5, 0, 5, 3]]}],
            'categories': cats}
  else:
    data = {'videos': [{'id': 3, 'file_names': ['v/00000.jpg'], 'height': 4, 'width': 6,
                        'length': 1}],
            'annotations': [{'id': 1, 'video_id': 3, 'category_id': ids[-1], 'iscrowd': 0,
                             'segmentations': [rle], 'areas': [6], 'bboxes': [[0, 0, 2, 3]]}],
            'categories': cats}
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(data, f)


@pytest.mark.parametrize('dataset,spec', [('ytvis_2019', 'minvis'),
                                          ('ytvis_2021', 'minvis:dataset=ytvis_2021'),
                                          ('ytvis_2022', 'minvis:dataset=ytvis_2021'),
                                          ('ovis', 'minvis:dataset=ovis'), ('coco', 'coco')])
def test_official_layouts_pass_and_a_renamed_category_fails(tmp_path, dataset, spec):
  c = config_lib.load_config(spec)
  c.data.dataset = dataset
  json_path, _ = ytvis.split_paths(dataset, str(tmp_path), 'train')
  _official_json(json_path, dataset, reverse=True)
  ds = ytvis.load_split(dataset, str(tmp_path), 'train')
  categories.check(c.data, ds)
  # The one annotation has the last class.
  instances = [i for v in ds.videos for i in v.instances]
  assert [i.category for i in instances] == [c.model.num_classes - 1]
  last = c.data.category_ids[-1]
  _official_json(json_path, dataset, names_override={last: 'unicorn'})
  wrong = ytvis.load_split(dataset, str(tmp_path), 'train')
  with pytest.raises(ValueError, match=rf"{os.path.basename(json_path)}: category id {last} is "
                                       rf"named 'unicorn', the config's {dataset} table says"):
    categories.check(c.data, wrong)


def test_training_input_checks_the_categories(tmp_path):
  """The trainer's source (input_pipeline.make_source) refuses a 2019 file under a 2021 config."""
  source = str(tmp_path / 'synthetic')
  synthetic.generate(source, 'train', 1, 2, layouts.H, layouts.W, seed=1)
  root = str(tmp_path / 'y19')
  layouts.relayout(source, root, 'ytvis_2019', splits=('train',), official_categories=True)
  c = config_lib.load_config('minvis:dataset=ytvis_2021')
  c.data.dataset, c.data.manual_dir = 'ytvis_2019', root
  with pytest.raises(ValueError, match=r'train\.json: category id 1 is named \'person\', the '
                                       r'config\'s ytvis_2019 table says \'airplane\''):
    input_pipeline.make_source(c.data, 'train')
  c19 = config_lib.load_config('minvis')
  c19.data.manual_dir = root
  assert input_pipeline.make_source(c19.data, 'train').num_videos == 1
