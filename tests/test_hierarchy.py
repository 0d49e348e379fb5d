"""Grouping, grouping analysis, two-stage classification and the bias measures (METHOD section 10)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ltdd_fast.errors import ConfigError, DataError
from ltdd_fast.evaluate import (
    EvalConfig, EvalReport, bias_measures, kl_from_uniform, per_class_accuracy, prediction_counts, random_real,
)
from ltdd_fast.hierarchy import (
    Grouping, TwoStageClassifier, combine_stages, confusion_affinity, confusion_matrix, eigengap_num_groups,
    evaluate_flat_and_two_stage, group_by_confusion, group_by_features, group_by_frequency, group_targets,
    grouping_analysis, held_out_mask, image_classes_of, train_two_stage,
)


def partition(grouping):
    return {frozenset(g) for g in grouping.groups}


# ---------------------------------------------------------------- grouping by frequency


def test_frequency_grouping_digits_lt_counts():
    g = group_by_frequency([124, 80, 51, 33, 21, 14, 9, 5, 3, 2])
    assert g.groups == [[0], [1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert g.names == ["head", "medium", "tail"] and g.method == "frequency"
    assert g.group_of().tolist() == [0, 1, 1, 1, 1, 2, 2, 2, 2, 2]
    assert g.order() == list(range(10))


def test_frequency_grouping_boundaries_thresholds_and_empty_groups():
    # 101 > 100 is head; 100 and 20 are medium; 19 is tail (the many/medium/few convention)
    assert group_by_frequency([101, 100, 20, 19]).groups == [[0], [1, 2], [3]]
    # no head class: the group is dropped rather than left empty
    g = group_by_frequency([50, 30, 10, 5])
    assert g.groups == [[0, 1], [2, 3]] and g.names == ["medium", "tail"]
    assert group_by_frequency([50, 30, 10, 5], many=40, few=8).groups == [[0], [1, 2], [3]]
    assert group_by_frequency([500, 400]).num_groups == 1
    with pytest.raises(ConfigError, match="few threshold"):
        group_by_frequency([5, 3], many=10, few=20)


def test_grouping_must_partition_the_classes():
    with pytest.raises(DataError, match="partition"):
        Grouping([[0, 1], [1, 2]], "x")
    with pytest.raises(DataError, match="partition"):
        Grouping([[0], [2]], "x")
    with pytest.raises(DataError, match="at least one class"):
        Grouping([[0, 1], []], "x")


# ---------------------------------------------------------------- clustering recovers planted groups

PLANTED = [[0, 4, 7], [1, 2, 9, 11], [3, 5, 6, 8, 10]]


def block_confusion(blocks, seed=0, noise=1):
    rng = np.random.default_rng(seed)
    c = sum(len(b) for b in blocks)
    conf = rng.integers(0, noise + 1, (c, c)).astype(float)  # a little confusion everywhere
    for b in blocks:
        for i in b:
            for j in b:
                conf[i, j] += rng.integers(6, 15)
    np.fill_diagonal(conf, 60)
    return torch.tensor(conf)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spectral_clustering_recovers_planted_groups(seed):
    conf = block_confusion(PLANTED, seed)
    # the number of groups is found by the eigengap ...
    assert eigengap_num_groups(confusion_affinity(conf)) == 3
    g = group_by_confusion(conf, seed=seed)
    assert partition(g) == {frozenset(b) for b in PLANTED}
    # ... or given
    assert partition(group_by_confusion(conf, num_groups=3, seed=seed)) == {frozenset(b) for b in PLANTED}


def test_confusion_clustering_ignores_class_size_and_direction():
    # class sizes differ tenfold and confusion is one-directional: row normalisation and symmetrisation
    conf = torch.zeros(6, 6)
    sizes = [1000, 1000, 1000, 10, 10, 10]
    for i in range(6):
        conf[i, i] = 0.8 * sizes[i]
    for a, b in [(0, 1), (1, 2), (2, 0)]:
        conf[a, b] = 0.2 * sizes[a]
    for a, b in [(3, 4), (4, 5), (5, 3)]:
        conf[a, b] = 0.2 * sizes[a]
    g = group_by_confusion(conf, class_counts=[1, 1, 1, 5, 5, 5])
    assert g.groups == [[3, 4, 5], [0, 1, 2]]  # head-most group (by training count) first


def test_feature_kmeans_recovers_planted_groups():
    rng = np.random.default_rng(0)
    means = np.zeros((12, 16))
    for k, block in enumerate(PLANTED):
        centre = rng.normal(size=16)
        for c in block:
            means[c] = centre + 0.1 * rng.normal(size=16)
    g = group_by_features(torch.tensor(means))
    assert partition(g) == {frozenset(b) for b in PLANTED} and g.method == "features"
    # the count of each class orders the groups: put the largest counts in the last planted block
    counts = [1] * 12
    for c in PLANTED[2]:
        counts[c] = 100
    assert group_by_features(torch.tensor(means), num_groups=3, class_counts=counts).groups[0] == PLANTED[2]


def test_clustering_rejects_bad_input():
    with pytest.raises(ConfigError, match="num_groups"):
        group_by_confusion(block_confusion(PLANTED), num_groups=12)
    with pytest.raises(ConfigError, match="num_groups"):
        group_by_features(torch.randn(5, 3), num_groups=1)
    with pytest.raises(DataError, match="square"):
        group_by_confusion(torch.ones(3, 4))
    with pytest.raises(DataError, match="NaN"):
        group_by_features(torch.tensor([[0.0, 1.0], [1.0, float("nan")], [1.0, 1.0]]))


# ---------------------------------------------------------------- the grouping analysis


def test_confusion_matrix_counts():
    conf = confusion_matrix(torch.tensor([0, 1, 1, 2, 0]), torch.tensor([0, 1, 2, 2, 2]), 3)
    assert conf.tolist() == [[1, 0, 0], [0, 1, 0], [1, 1, 1]]
    with pytest.raises(DataError, match=r"\[0, 3\)"):
        confusion_matrix(torch.tensor([3]), torch.tensor([0]), 3)


def test_grouping_analysis_hand_made():
    # 4 classes, groups {0,1} (head, counts 100 and 80) and {2,3} (tail, counts 10 and 5)
    conf = torch.tensor([[10, 2, 0, 0],
                         [1, 10, 0, 1],
                         [6, 0, 10, 3],
                         [2, 2, 1, 10]])
    grouping = Grouping([[0, 1], [2, 3]], "hand")
    r = grouping_analysis(conf, grouping, [100, 80, 10, 5], many=50, few=20, permutations=200)
    assert r["errors"] == 18
    assert r["within_group_errors"] == 2 + 1 + 3 + 1
    assert r["cross_group_errors"] == 1 + 6 + 2 + 2
    assert r["within_group_share"] == pytest.approx(7 / 18)
    # each class spreads its errors uniformly: 1 of its 3 other classes is in its group
    assert r["within_group_share_chance"] == pytest.approx(1 / 3)
    assert r["cross_toward_head"] == 10 and r["cross_toward_tail"] == 1
    assert r["cross_toward_head_share"] == pytest.approx(10 / 11)
    # single classes: toward a larger class 1 (1->0)... count them all
    more = 1 + 6 + 2 + 2 + 1 + 0  # 1->0, 2->0, 3->0, 3->1, 3->2, 2->1
    fewer = 2 + 1 + 3  # 0->1, 1->3, 2->3
    assert r["errors_toward_more_frequent_class_share"] == pytest.approx(more / (more + fewer))
    assert r["group_confusion"] == [[3, 1], [10, 4]]
    # frequency groups at many=50, few=20: head {0,1}, tail {2,3}, no medium
    assert r["tail_predicted_as_head"] == 10 and r["head_predicted_as_tail"] == 1
    assert r["frequency_flow"]["tail"]["tail"] == 4 and r["frequency_flow"]["medium"]["head"] == 0
    assert r["accuracy"] == pytest.approx(40 / 58)
    assert 0 < r["permutation_p_value"] <= 1 and r["permutations"] == 200
    assert "agreement_with_frequency_ari" in r and r["agreement_with_frequency_ari"] == pytest.approx(1.0)
    assert "go toward the more frequent group" in r["verdict"]
    json.dumps(r)


def test_grouping_analysis_planted_groups_are_significant():
    conf = block_confusion(PLANTED, seed=3)
    r = grouping_analysis(conf, Grouping(PLANTED, "planted"), [1] * 12, permutations=500)
    assert r["within_group_share"] > 2 * r["within_group_share_chance"]
    assert r["permutation_p_value"] < 0.01 and "concentrate inside the groups" in r["verdict"]
    # a grouping unrelated to the blocks is not
    other = Grouping([[0, 1, 3], [4, 2, 5, 10], [7, 9, 11, 6, 8]], "other")
    assert grouping_analysis(conf, other, [1] * 12, permutations=500)["permutation_p_value"] > 0.05


def test_held_out_mask_excludes_used_images_but_keeps_every_class():
    train = torch.arange(6 * 4, dtype=torch.float32).view(6, 1, 2, 2)
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    keep = held_out_mask(train, labels, train[[0, 3, 4, 5]], 3)
    # class 0 loses image 0; class 1 would lose both images and keeps them; class 2 likewise
    assert keep.tolist() == [False, True, True, True, True, True]
    assert held_out_mask(train, labels, None, 3).all()


# ---------------------------------------------------------------- bias measures


def test_bias_measures_hand_made_predictions():
    # 3 classes, 4 test images each; counts: class 0 head (200), class 1 medium (50), class 2 tail (5)
    target = torch.tensor([0] * 4 + [1] * 4 + [2] * 4)
    pred = torch.tensor([0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 2])
    acc = per_class_accuracy(pred, target, 3)
    assert acc == [1.0, 0.5, 0.25]
    counts = prediction_counts(pred, 3)
    assert counts == [9, 2, 1]
    b = bias_measures(acc, [200, 50, 5], counts)
    assert b["per_class_std"] == pytest.approx(np.std([1.0, 0.5, 0.25]))
    assert b["head_tail_gap"] == pytest.approx(0.75)
    q = np.array([9, 2, 1]) / 12
    assert b["pred_kl_uniform"] == pytest.approx(float(np.sum(q * np.log(3 * q))))
    # a uniform histogram is 0; everything on one class is log C
    assert kl_from_uniform([4, 4, 4]) == pytest.approx(0.0)
    assert kl_from_uniform([12, 0, 0]) == pytest.approx(math.log(3))
    # no head or no tail class: no gap
    assert bias_measures(acc, [50, 40, 30], counts)["head_tail_gap"] is None
    with pytest.raises(DataError):
        kl_from_uniform([0, 0])
    with pytest.raises(DataError, match="one per class"):
        bias_measures(acc, [200, 50, 5], [1, 2])


def test_report_bias_is_the_mean_over_runs_and_can_be_cut():
    per_class = [[1.0, 0.5, 0.0], [1.0, 1.0, 1.0]]
    counts = [[8, 2, 2], [4, 4, 4]]
    r = EvalReport.from_runs("x", [0.5, 1.0], per_class, counts, [200, 50, 5])
    assert r.per_class == [1.0, 0.75, 0.5]
    assert r.per_class_std == pytest.approx(np.std([1.0, 0.5, 0.0]) / 2)
    assert r.head_tail_gap == pytest.approx(0.5) == pytest.approx(r.many - r.few)
    assert r.pred_kl_uniform == pytest.approx(kl_from_uniform([8, 2, 2]) / 2)
    one = r.first_runs(1)
    assert one.run_accuracies == [0.5] and one.per_class == [1.0, 0.5, 0.0] and one.head_tail_gap == 1.0
    d = json.loads(json.dumps(r.to_dict()))
    assert d["per_class_std"] == r.per_class_std and d["run_pred_counts"] == counts
    assert "head-tail gap 50.00" in r.format_table()
    with pytest.raises(ConfigError):
        r.first_runs(3)


# ---------------------------------------------------------------- two-stage inference


def test_combine_stages_hard_and_soft_on_two_groups():
    # classes {0, 1} form group 0, {2, 3, 4} group 1
    grouping = Grouping([[0, 1], [2, 3, 4]], "hand")
    group_probs = torch.tensor([[0.6, 0.4], [0.45, 0.55], [0.9, 0.1]])
    within = [torch.tensor([[0.5, 0.5], [0.99, 0.01], [0.2, 0.8]]),
              torch.tensor([[0.9, 0.05, 0.05], [0.34, 0.33, 0.33], [0.1, 0.1, 0.8]])]
    # hard: the most likely group, then the best class in it
    assert combine_stages(group_probs, within, grouping, "hard").tolist() == [0, 2, 1]
    # soft: p(group) * p(class | group): 0.6*0.5=.30 vs 0.4*0.9=.36 -> class 2; .45*.99=.4455 beats .55*.34
    assert combine_stages(group_probs, within, grouping, "soft").tolist() == [2, 0, 1]
    with pytest.raises(ConfigError, match="combine"):
        combine_stages(group_probs, within, grouping, "vote")
    with pytest.raises(DataError):
        combine_stages(group_probs, within[:1], grouping)


class FixedLogits(nn.Module):
    """Logits that are a fixed linear function of the first pixel: a hand-made trained network."""

    def __init__(self, rows):
        super().__init__()
        self.w = torch.tensor(rows, dtype=torch.float32)

    def forward(self, x):
        v = x[:, 0, 0, 0]
        return torch.stack([v, torch.ones_like(v)], dim=1) @ self.w.T


def test_two_stage_classifier_with_a_one_class_group():
    grouping = Grouping([[1], [0, 2]], "hand")  # class 1 alone; classes 0 and 2 share a group
    # group net: positive pixel -> group 1; class net of group 1: pixel > 2 -> class 2, else class 0
    group_net = FixedLogits([[-5.0, 0.0], [5.0, 0.0]])
    within_net = FixedLogits([[-5.0, 10.0], [5.0, -10.0]])
    model = TwoStageClassifier(group_net, [None, within_net], grouping)
    x = torch.tensor([-1.0, 1.0, 3.0]).view(3, 1, 1, 1)
    assert model.predict(x, "hard").tolist() == [1, 0, 2]
    assert model.predict(x, "soft").tolist() == [1, 0, 2]
    with pytest.raises(DataError):
        TwoStageClassifier(group_net, [within_net], grouping)


# ---------------------------------------------------------------- two-stage training targets and runs


def test_group_targets_hard_labels():
    grouping = Grouping([[0], [1, 3], [2, 4]], "hand")
    labels = torch.tensor([0, 1, 2, 3, 4, 3])
    gt, per_group = group_targets(labels, labels, grouping)
    assert gt.tolist() == [0, 1, 2, 1, 2, 1]
    assert per_group[0] is None  # one class, no classifier
    idx, t = per_group[1]
    assert idx.tolist() == [1, 3, 5] and t.tolist() == [0, 1, 1]
    idx, t = per_group[2]
    assert idx.tolist() == [2, 4] and t.tolist() == [0, 1]


def test_group_targets_soft_labels_restricted_and_renormalised():
    torch.manual_seed(0)
    grouping = Grouping([[0, 1], [2, 3, 4]], "hand")
    logits = torch.randn(10, 5) * 3
    classes = torch.arange(5).repeat_interleave(2)
    gt, per_group = group_targets(logits, classes, grouping)
    assert gt.tolist() == [0] * 4 + [1] * 6
    probs = torch.softmax(logits, 1)
    for k, grp in enumerate(grouping.groups):
        idx, t = per_group[k]
        assert idx.tolist() == [i for i in range(10) if int(classes[i]) in grp]
        restricted = probs[idx][:, grp]
        torch.testing.assert_close(torch.softmax(t, 1), restricted / restricted.sum(1, keepdim=True))
    # soft group labels: the label's probability mass on each group
    gt_soft, _ = group_targets(logits, classes, grouping, soft_group_labels=True)
    torch.testing.assert_close(torch.softmax(gt_soft, 1),
                               torch.stack([probs[:, [0, 1]].sum(1), probs[:, [2, 3, 4]].sum(1)], 1))


def test_image_classes_follow_the_synset_layout_not_the_drifted_label():
    logits = torch.zeros(6, 3)
    logits[:, 0] = 5.0  # every learned label now points at the head class
    assert image_classes_of(logits, 3).tolist() == [0, 0, 1, 1, 2, 2]
    assert image_classes_of(torch.tensor([2, 0, 1]), 3).tolist() == [2, 0, 1]
    with pytest.raises(DataError, match="image_classes"):
        image_classes_of(torch.zeros(7, 3), 3)


TINY = EvalConfig(epochs=15, num_runs=1, seed=0)


@pytest.fixture(scope="module")
def soft_synset(digits):
    """Random real images, 5 per class laid out class by class, with soft labels that leak mass onto
    the head class (as plain matching's labels do)."""
    g = torch.Generator().manual_seed(0)
    labels = digits.labels_train
    idx = torch.cat([torch.nonzero(labels == c).flatten()[torch.arange(5) % int((labels == c).sum())]
                     for c in range(digits.num_classes)])
    images = digits.images_train[idx]
    logits = torch.nn.functional.one_hot(labels[idx], 10).float() * 4 + 0.5 * torch.randn(len(idx), 10, generator=g)
    logits[:, 0] += 2.0
    return images, logits


def test_two_stage_trains_on_a_soft_labelled_synthetic_set(digits, soft_synset):
    images, logits = soft_synset
    grouping = group_by_frequency(digits.class_counts)
    state = torch.get_rng_state()
    res = train_two_stage(images, logits, digits, TINY, grouping, combine="soft", name="soft", progress=False)
    assert torch.equal(state, torch.get_rng_state())
    r = res.report
    assert r.name == "soft" and res.combine == "soft" and set(res.by_combine) == {"hard", "soft"}
    assert r.overall_mean > 0.3, r.overall_mean  # well above the 10% of chance after 15 epochs
    assert len(r.per_class) == 10 and r.per_class_std is not None and r.pred_kl_uniform >= 0
    assert r.head_tail_gap == pytest.approx(r.many - r.few)
    assert 0.3 < res.group_accuracy <= 1
    assert res.within_group_accuracy[0] == 1.0 and all(0 <= a <= 1 for a in res.within_group_accuracy)
    d = json.loads(json.dumps(res.to_dict()))
    assert d["grouping"]["groups"] == [[0], [1, 2, 3, 4], [5, 6, 7, 8, 9]] and d["combine"] == "soft"
    # deterministic for a fixed seed
    again = train_two_stage(images, logits, digits, TINY, grouping, combine="soft", name="soft", progress=False)
    assert again.report.to_dict() == r.to_dict()


def test_flat_and_two_stage_with_a_learned_grouping(digits):
    images, labels = random_real(digits, 5, seed=0)
    res = evaluate_flat_and_two_stage(images, labels, digits, TINY, groups="confusion", num_groups=3,
                                      name="random", progress=False)
    assert res.grouping.method == "confusion" and res.grouping.num_groups == 3
    assert "training images not in its training set" in res.grouping.source
    assert res.flat is not None and res.flat.name == "random" and res.report.name == "random two-stage"
    assert res.to_dict()["flat"]["overall_mean"] == res.flat.overall_mean


def test_two_stage_rejects_bad_setups(digits):
    images, labels = random_real(digits, 2, seed=0)
    with pytest.raises(ConfigError, match="single group"):
        train_two_stage(images, labels, digits, TINY, Grouping([list(range(10))], "one"), progress=False)
    with pytest.raises(DataError, match="covers 3 classes"):
        train_two_stage(images, labels, digits, TINY, Grouping([[0], [1, 2]], "small"), progress=False)
    with pytest.raises(ConfigError, match="combine"):
        train_two_stage(images, labels, digits, TINY, group_by_frequency(digits.class_counts), combine="x",
                        progress=False)
    with pytest.raises(ConfigError, match="every class"):
        evaluate_flat_and_two_stage(images, labels, digits, EvalConfig(epochs=1, num_runs=1, many_threshold=1,
                                                                       few_threshold=1), progress=False)
    with pytest.raises(ConfigError, match="frequency"):
        evaluate_flat_and_two_stage(images, labels, digits, TINY, groups="frequency", num_groups=2, progress=False)
    with pytest.raises(ConfigError, match="grouping method"):
        evaluate_flat_and_two_stage(images, labels, digits, TINY, groups="random", progress=False)


# ---------------------------------------------------------------- the command line

LTDD = [str(Path(sys.executable).parent / "ltdd")]


def ltdd(*args, cwd=None):
    return subprocess.run(LTDD + [str(a) for a in args], capture_output=True, text=True, cwd=cwd, timeout=600)


def assert_one_line_error(result, *needles):
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


BIAS_KEYS = ("overall_mean", "many", "medium", "few", "per_class_std", "head_tail_gap", "pred_kl_uniform")


def test_cli_eval_two_stage_json(tmp_path):
    out = tmp_path / "ts.json"
    result = ltdd("eval", "--dataset", "digits", "--imbalance-factor", 50, "--random-ipc", 10, "--two-stage",
                  "--groups", "frequency", "--json", out, "--epochs", 3, "--num-runs", 1, "--quiet")
    assert result.returncode == 0, result.stderr
    d = json.loads(out.read_text())
    for key in BIAS_KEYS:
        assert key in d and key in d["flat"], key
    assert d["head_tail_gap"] == pytest.approx(d["many"] - d["few"])
    assert d["grouping"]["groups"] == [[0], [1, 2, 3, 4], [5, 6, 7, 8, 9]] and d["combine"] == "hard"
    assert len(d["per_class"]) == 10 and len(d["flat"]["run_accuracies"]) == 1
    assert "two-stage" in result.stdout and "bias: per-class std" in result.stdout


def test_cli_eval_flat_reports_bias(tmp_path):
    out = tmp_path / "flat.json"
    result = ltdd("eval", "--dataset", "digits", "--imbalance-factor", 50, "--random-ipc", 3, "--json", out,
                  "--epochs", 2, "--num-runs", 1, "--quiet")
    assert result.returncode == 0, result.stderr
    d = json.loads(out.read_text())
    for key in BIAS_KEYS:
        assert key in d
    assert "flat" not in d and "grouping" not in d


def test_cli_groups_on_a_trained_network(tmp_path):
    out, png = tmp_path / "g.json", tmp_path / "g.png"
    result = ltdd("groups", "--dataset", "digits", "--imbalance-factor", 50, "--random-ipc", 5, "--method",
                  "confusion", "--num-groups", 3, "--epochs", 5, "--json", out, "--png", png, "--quiet")
    assert result.returncode == 0, result.stderr
    d = json.loads(out.read_text())
    assert d["num_groups"] == 3 and d["grouping"]["method"] == "confusion" and d["cluster_on"] == "train"
    assert sorted(c for g in d["grouping"]["groups"] for c in g) == list(range(10))
    assert np.array(d["confusion"]).sum() == 500 and d["circular"] is False
    for key in ("within_group_share", "within_group_share_chance", "permutation_p_value", "cross_toward_head",
                "cross_toward_tail", "tail_predicted_as_head", "head_predicted_as_tail", "verdict",
                "per_class_std", "head_tail_gap", "pred_kl_uniform"):
        assert key in d, key
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    assert "errors stay inside a group" in result.stdout


def test_cli_groups_on_an_expert(tmp_path):
    from ltdd_fast.data import load_dataset
    from ltdd_fast.experts import ExpertConfig, train_experts

    dataset = load_dataset("digits", imbalance_factor=50, seed=0)
    train_experts(dataset, ExpertConfig(num_experts=1, epochs=2, width=16, batch_size=64), tmp_path / "e",
                  progress=False)
    out = tmp_path / "g.json"
    result = ltdd("groups", "--experts", tmp_path / "e", "--method", "features", "--json", out, "--quiet")
    assert result.returncode == 0, result.stderr
    d = json.loads(out.read_text())
    assert d["model"].startswith("expert 0") and d["grouping"]["method"] == "features"
    assert 2 <= d["num_groups"] <= 5 and d["imbalance_factor"] == 50.0
    freq = ltdd("groups", "--experts", tmp_path / "e", "--quiet")
    assert freq.returncode == 0 and "head" in freq.stdout and "tail" in freq.stdout
    assert_one_line_error(ltdd("groups", "--experts", tmp_path / "e", "--expert-index", 3, "--quiet"), "expert 3")


@pytest.mark.parametrize("args, needles", [
    (["eval", "--dataset", "digits", "--random-ipc", 2, "--groups", "confusion"], ["--groups", "--two-stage"]),
    (["eval", "--dataset", "digits", "--random-ipc", 2, "--combine", "soft", "--num-groups", 3],
     ["--num-groups", "--combine", "--two-stage"]),
    (["eval", "--dataset", "digits", "--random-ipc", 2, "--two-stage", "--num-groups", 3], ["--num-groups", "frequency"]),
    (["eval", "--dataset", "digits", "--random-ipc", 2, "--two-stage", "--groups", "features", "--num-groups", 1],
     ["--num-groups", "at least 2"]),
    (["eval", "--dataset", "digits", "--random-ipc", 2, "--two-stage", "--groups", "kmeans"], ["invalid choice"]),
    (["eval", "--dataset", "digits", "--random-ipc", 2, "--few-threshold", 50, "--many-threshold", 10],
     ["--few-threshold"]),
    (["eval", "--dataset", "digits", "--imbalance-factor", 50, "--random-ipc", 2, "--two-stage", "--groups",
      "confusion", "--num-groups", 10], ["num_groups", "2..9"]),
    (["eval", "--dataset", "digits", "--imbalance-factor", 1, "--random-ipc", 2, "--two-stage"], ["every class"]),
    (["groups", "--dataset", "digits", "--random-ipc", 2, "--cluster-on", "test"], ["--cluster-on"]),
    (["groups", "--dataset", "digits", "--random-ipc", 2, "--num-groups", 3], ["--num-groups", "frequency"]),
    (["groups", "--dataset", "digits", "--random-ipc", 2, "--expert-index", 0], ["--experts"]),
    (["groups", "--dataset", "digits", "--random-ipc", 0], ["--random-ipc"]),
    (["groups", "--experts", "/nonexistent"], ["/nonexistent"]),
    (["groups", "--dataset", "digits"], ["one of the arguments"]),
])
def test_cli_bad_input_is_one_line_exit_2(args, needles, tmp_path):
    assert_one_line_error(ltdd(*args, "--quiet", cwd=tmp_path), *needles)
