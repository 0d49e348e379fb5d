"""Grouping and two-stage hierarchical classification on distilled data (METHOD section 10).

Grouping. Classes are put into groups
- by frequency: head (more than `many` training images), medium, tail (fewer than `few`), the
  thresholds of the many/medium/few split; empty groups are dropped;
- by confusion: spectral clustering of the symmetrised, row-normalised confusion matrix of a model
  (affinity of classes i and j = (M[i, j] + M[j, i]) / 2, M = confusion with rows summing to 1,
  diagonal dropped); the number of groups, unless given, is the largest eigengap of the normalised
  graph Laplacian;
- by features: k-means of the model's class-mean penultimate features (L2-normalised); the number
  of groups, unless given, is the one with the best silhouette.
A chosen number of groups lies in 2..max(2, C // 2): more would leave mostly one-class groups.
Groups are ordered head-most first (by the mean training count of their classes).

Grouping analysis (`grouping_analysis`, `ltdd groups`): on a confusion matrix, the share of errors
that stay inside a group against the share expected if each class's errors fell uniformly on the
other classes, a permutation test (classes shuffled among groups of the same sizes), and the
direction of errors: cross-group errors toward the more or the less frequent group, and between the
frequency groups (tail predicted as head and the reverse).

Two-stage classification (`train_two_stage`, `ltdd eval --two-stage`): on any training set (a
distilled set, random real images), a group classifier trained on all images with the group of each
image's class as its label, then one classifier per group on that group's images (soft labels
restricted to the group's classes and renormalised; a group of one class needs none). Every network
is trained by evaluate.py's protocol with the same settings (epochs, lr, DSA, batch size) as the
flat evaluation, and all networks of run r are seeded with config.seed + r. Inference: the group
first, then the class inside it ("hard"), or p(class) = p(group) * p(class | group) ("soft").

Honesty of groupings learned from a model: two-stage training never looks at test labels. The
confusion grouping uses the flat network's confusion on the long-tailed *training* images that are
not themselves in the training set of that network (a class all of whose images are in it keeps
them), the feature grouping the class means over all training images.

Modules: groups (the groupings), from_model (what a model says: predictions, features, learned groupings, an
expert as a model), analysis (the grouping analysis), two_stage (training and evaluating the two stages). May
import: errors, evaluate (its training protocol), models. The heatmap is drawn by plots.save_heatmap.
"""
from .analysis import format_analysis, grouping_analysis
from .from_model import (class_mean_features, expert_network, grouping_from_model, held_out_mask,
                         model_predictions)
from .groups import (FREQUENCY_NAMES, METHODS, Grouping, confusion_affinity, confusion_matrix, eigengap_num_groups,
                     group_by_confusion, group_by_features, group_by_frequency, group_by_rank, max_auto_groups)
from .two_stage import (COMBINES, TwoStageClassifier, TwoStageResult, combine_stages, evaluate_flat_and_two_stage,
                        group_targets, image_classes_of, train_two_stage)

__all__ = ["COMBINES", "FREQUENCY_NAMES", "METHODS", "Grouping", "TwoStageClassifier", "TwoStageResult",
           "class_mean_features", "combine_stages", "confusion_affinity", "confusion_matrix", "eigengap_num_groups",
           "evaluate_flat_and_two_stage", "expert_network", "format_analysis", "group_by_confusion",
           "group_by_features", "group_by_frequency", "group_by_rank", "group_targets", "grouping_analysis",
           "grouping_from_model", "held_out_mask", "image_classes_of", "max_auto_groups", "model_predictions",
           "train_two_stage"]
