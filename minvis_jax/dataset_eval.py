"""MinVIS over the videos of a dataset split -> results-file entries; writing result files."""

import json
import os

from tqdm import tqdm

from minvis_jax import predictor as predictor_lib
from minvis_jax.data import ytvis


def predict_dataset(config, variables, dataset, max_videos: int | None = None,
                    top_k: int | None = None, window: int | None = None,
                    progress: bool = True) -> list[dict]:
  """Runs MinVIS over the videos of a `VisDataset` (the first `max_videos` if given).

  Returns results-file entries {video_id, category_id (dataset id), score, segmentations} with one
  RLE per frame at the video's size.
  """
  videos = dataset.videos if max_videos is None else dataset.videos[:max_videos]
  predictor = predictor_lib.from_config(config, variables, top_k, window)
  results = []
  bar = tqdm(total=sum(len(v.frame_paths) for v in videos), unit='frame', disable=not progress,
             desc='evaluate', dynamic_ncols=True)
  with bar:
    for video in videos:
      where = f'{dataset.json_path}: video {video.id} ({video.name!r})'
      if not video.frame_paths:
        raise ValueError(f'{where}: no frames')
      bar.set_postfix_str(str(video.name), refresh=False)

      def frames(video=video, where=where):
        for path in video.frame_paths:
          image = ytvis.read_frame(path)
          ytvis.check_frame_size(image, video, path, where)
          bar.update(1)
          yield image
      size = (video.height, video.width)
      tracks = predictor(predictor_lib.preprocess(frames(), config.data),
                         predictor_lib.valid_size(*size, config.data), size)
      results.extend(predictor_lib.results_for_video(tracks, video.id, dataset.category_ids))
  return results


def write_json(path: str, obj) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f)
  os.replace(tmp, path)


def subset_ground_truth(json_path: str, video_ids: set) -> dict:
  """The ground-truth JSON restricted to `video_ids` (when only some videos were run)."""
  with open(json_path) as f:
    gt = json.load(f)
  gt['videos'] = [v for v in gt['videos'] if v['id'] in video_ids]
  gt['annotations'] = [a for a in gt.get('annotations', []) if a['video_id'] in video_ids]
  return gt


