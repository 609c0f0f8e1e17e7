"""Learning core: U-net, losses, training data, resumable training and whole-slice inference."""

from .data import Normalisation, PatchSampler, SliceDataset, SubjectPaths, load_subject, split_subjects
from .losses import make_loss
from .networks import NetworkSpec, UNet, count_parameters, default_networks
from .train import PREEMPTED_EXIT_CODE, Preempted, predict_volume, train

__all__ = [
    "PREEMPTED_EXIT_CODE",
    "NetworkSpec",
    "Normalisation",
    "PatchSampler",
    "Preempted",
    "SliceDataset",
    "SubjectPaths",
    "UNet",
    "count_parameters",
    "default_networks",
    "load_subject",
    "make_loss",
    "predict_volume",
    "split_subjects",
    "train",
]
