"""Frozen feature networks used as training targets: the DINOv2 REPA teacher (spec §4.2)."""

from pixeldit_jax.teacher.dinov2 import (IMAGENET_MEAN, IMAGENET_STD, MISSING_WEIGHTS, Dinov2,
                                         Dinov2Config, TeacherWeightsMismatch, abstract_teacher,
                                         convert_state_dict, load_teacher, preprocess,
                                         read_state_dict, repa_input_size, resolve_weights_path,
                                         teacher_features)
from pixeldit_jax.teacher.resize import torch_bicubic_resize

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "MISSING_WEIGHTS", "Dinov2", "Dinov2Config",
    "TeacherWeightsMismatch", "abstract_teacher", "convert_state_dict", "load_teacher",
    "preprocess", "read_state_dict", "repa_input_size", "resolve_weights_path",
    "teacher_features", "torch_bicubic_resize",
]
