"""Small dataset folders in each standard layout, built from generated data (shared by tests)."""

import json
import os
import shutil

import numpy as np
from PIL import Image

from minvis_jax.data import categories
from minvis_jax.data import ytvis

H, W = 40, 56


def relayout(src_root: str, dst_root: str, dataset: str, splits=('train', 'valid'),
             official_categories: bool = False) -> None:
  """Copies the synthetic folder into another dataset's standard layout; with official_categories
  the JSON lists the dataset's real categories (synthetic id k becomes the table's k-th id)."""
  for split in splits:
    json_src, images_src = ytvis.split_paths('synthetic', src_root, split)
    json_dst, images_dst = ytvis.split_paths(dataset, dst_root, split)
    os.makedirs(os.path.dirname(json_dst), exist_ok=True)
    shutil.copy(json_src, json_dst)
    shutil.copytree(images_src, images_dst)
    if official_categories:
      with open(json_dst) as f:
        data = json.load(f)
      ids, names = categories.table(dataset)
      data['categories'] = [{'id': i, 'name': n} for i, n in zip(ids, names)]
      for ann in data['annotations']:
        ann['category_id'] = ids[ann['category_id'] - 1]
      with open(json_dst, 'w') as f:
        json.dump(data, f)


def coco_root(root: str, all_categories: bool = False) -> None:
  """A 3-image COCO folder: polygons, a crowd uncompressed RLE, an image without annotations; the
  categories are person and dog, or all 80 of COCO with all_categories."""
  json_path, image_root = ytvis.split_paths('coco', root, 'train')
  os.makedirs(image_root)
  rng = np.random.default_rng(0)
  sizes = [(H, W), (30, 44), (H, W)]
  images = []
  for i, (h, w) in enumerate(sizes):
    name = f'{i + 1:012d}.jpg'
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
        os.path.join(image_root, name))
    images.append({'id': i + 1, 'file_name': name, 'height': h, 'width': w})
  crowd = np.zeros((30, 44), np.uint8)
  crowd[5:20, 10:30] = 1
  flat = crowd.flatten(order='F')
  change = np.flatnonzero(np.diff(flat)) + 1
  counts = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
  anns = [
      {'id': 10, 'image_id': 1, 'category_id': 18, 'iscrowd': 0,
       'segmentation': [[2.0, 2.0, 30.0, 4.0, 20.0, 35.0], [40.0, 5.0, 50.0, 5.0, 50.0, 15.0]]},
      {'id': 11, 'image_id': 1, 'category_id': 1, 'iscrowd': 0,
       'segmentation': [[10.0, 10.0, 20.0, 10.0, 20.0, 20.0, 10.0, 20.0]]},
      {'id': 12, 'image_id': 2, 'category_id': 1, 'iscrowd': 1,
       'segmentation': {'size': [30, 44], 'counts': counts}},
      {'id': 13, 'image_id': 2, 'category_id': 18, 'iscrowd': 0,
       'segmentation': [[1.0, 1.0, 12.0, 1.0, 6.0, 9.0]]},
  ]
  cats = [{'id': 1, 'name': 'person'}, {'id': 18, 'name': 'dog'}]
  if all_categories:
    cats = [{'id': i, 'name': n} for i, n in categories.COCO]
  os.makedirs(os.path.dirname(json_path))
  with open(json_path, 'w') as f:
    json.dump({'images': images, 'annotations': anns, 'categories': cats}, f)
