"""Checkpoint import: HF transformers and detectron2 Mask2Former / MinVIS, ImageNet backbones.

Every `params_from_*` takes a flat {name: numpy array} mapping and returns the complete `variables`
of `Mask2Former(model_config).apply`; a missing, unexpected or mis-shaped key raises ValueError.
The command is `minvis-jax convert` (minvis_jax/cli.py).
"""

from minvis_jax.convert.detectron2 import params_from_detectron2
from minvis_jax.convert.hf import HF_WEIGHT_FILES
from minvis_jax.convert.hf import experiment_config
from minvis_jax.convert.hf import experiment_for
from minvis_jax.convert.hf import hf_files
from minvis_jax.convert.hf import hf_labels
from minvis_jax.convert.hf import model_config_from_hf
from minvis_jax.convert.hf import params_from_hf
from minvis_jax.convert.hf import read_hf_config
from minvis_jax.convert.hf import read_weights
from minvis_jax.convert.weights import check_state_shapes
from minvis_jax.convert.weights import params_from_backbone
from minvis_jax.convert.weights import params_with_backbone
from minvis_jax.convert.weights import read_state_dict

__all__ = [
    'HF_WEIGHT_FILES', 'check_state_shapes', 'experiment_config', 'experiment_for', 'hf_files',
    'hf_labels', 'model_config_from_hf', 'params_from_backbone', 'params_from_detectron2',
    'params_from_hf', 'params_with_backbone', 'read_hf_config', 'read_state_dict', 'read_weights',
]
