"""Sample-quality metrics for generated instance chips."""

from synthgen.metrics.distribution import (
    frechet_distance,
    kid,
    mean_pairwise_distance,
    nearest_distance,
    precision_recall,
)
from synthgen.metrics.evaluate import evaluate_samples
from synthgen.metrics.lpips import load_lpips, lpips_distance, mean_pairwise_lpips
from synthgen.metrics.realism import realism, two_sample_accuracy

__all__ = ["evaluate_samples", "frechet_distance", "kid", "load_lpips", "lpips_distance", "mean_pairwise_distance",
           "mean_pairwise_lpips", "nearest_distance", "precision_recall", "realism", "two_sample_accuracy"]
