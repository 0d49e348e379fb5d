"""The grouping analysis: on a confusion matrix, how many errors stay inside groups against chance, a permutation
test, and the direction of the errors across groups."""
from __future__ import annotations

import numpy as np
import torch

from ..errors import DataError
from ..evaluate import bias_measures
from .groups import FREQUENCY_NAMES, Grouping, check_counts, group_by_frequency


def grouping_analysis(confusion, grouping: Grouping, class_counts, many: int = 100, few: int = 20,
                      permutations: int | None = None, seed: int = 0, circular: bool = False) -> dict:
    """How the errors of a confusion matrix (rows true, columns predicted) sit with respect to groups.

    within_group_share: errors whose prediction is another class of the true class's group, over all
    errors; within_group_share_chance: the same if each class's errors fell uniformly on the C-1 other
    classes; permutation_p_value: share of random groupings with the same group sizes whose within
    share is at least as large (add-one smoothed). Cross-group errors go toward_head when the predicted
    group's mean training count is larger than the true group's. frequency_flow[i][j]: errors from
    frequency group i to j (head/medium/tail by the many/few thresholds, whatever `grouping` is).
    circular: the grouping was learned from this same confusion (the verdict says so).
    """
    conf = torch.as_tensor(confusion, dtype=torch.float64)
    c = conf.shape[0]
    if conf.dim() != 2 or conf.shape[1] != c or c != grouping.num_classes:
        raise DataError(f"confusion must be [C, C] with C = {grouping.num_classes} (the grouping's classes), "
                        f"got shape {tuple(conf.shape)}")
    counts = check_counts(class_counts)
    if len(counts) != c:
        raise DataError(f"class_counts has {len(counts)} entries for {c} classes")
    errors = conf.clone()
    errors.fill_diagonal_(0)
    total = float(errors.sum())
    group_of = grouping.group_of()
    same = group_of[:, None] == group_of[None, :]
    within = float(errors[same].sum())
    sizes = torch.tensor([len(grouping.groups[int(g)]) for g in group_of], dtype=torch.float64)
    per_class_errors = errors.sum(1)
    chance = float((per_class_errors * (sizes - 1) / max(c - 1, 1)).sum())
    # permutation test: the same group sizes, classes shuffled among them
    n_perm = permutations if permutations is not None else (1000 if c <= 200 else 100)
    rng = np.random.default_rng(seed)
    e = errors.numpy()
    g = group_of.numpy()
    at_least = 0
    for _ in range(n_perm):
        gp = g[rng.permutation(c)]
        if e[gp[:, None] == gp[None, :]].sum() >= within - 1e-9:
            at_least += 1
    # direction of cross-group errors, by the groups' mean training counts
    mean_count = [sum(counts[k] for k in grp) / len(grp) for grp in grouping.groups]
    toward_head = toward_tail = 0.0
    group_conf = torch.zeros(grouping.num_groups, grouping.num_groups, dtype=torch.float64)
    for a in range(grouping.num_groups):
        for b in range(grouping.num_groups):
            n = float(errors[grouping.groups[a]][:, grouping.groups[b]].sum())
            group_conf[a, b] = n
            if a != b:
                if mean_count[b] > mean_count[a]:
                    toward_head += n
                elif mean_count[b] < mean_count[a]:
                    toward_tail += n
    cross = total - within
    # errors between single classes: toward a class with more training images, or fewer
    cnt = torch.tensor(counts, dtype=torch.float64)
    to_more = float(errors[cnt[None, :] > cnt[:, None]].sum())
    to_fewer = float(errors[cnt[None, :] < cnt[:, None]].sum())
    freq = group_by_frequency(counts, many, few)
    flow = {a: {b: 0 for b in FREQUENCY_NAMES} for a in FREQUENCY_NAMES}
    for name_a, grp_a in zip(freq.names, freq.groups):
        for name_b, grp_b in zip(freq.names, freq.groups):
            flow[name_a][name_b] = int(errors[grp_a][:, grp_b].sum())
    correct = float(conf.diag().sum())
    tested = float(conf.sum())
    per_class = [float(conf[k, k] / conf[k].sum()) if conf[k].sum() > 0 else None for k in range(c)]
    pred_counts = conf.sum(0).tolist()

    def share(x, of):
        return x / of if of > 0 else None

    result = {
        "grouping": grouping.to_dict(),
        "num_groups": grouping.num_groups,
        "class_counts": counts,
        "confusion": conf.long().tolist(),
        "accuracy": share(correct, tested),
        "per_class": per_class,
        "errors": int(total),
        "within_group_errors": int(within),
        "cross_group_errors": int(cross),
        "within_group_share": share(within, total),
        "within_group_share_chance": share(chance, total),
        "within_group_lift": share(within, chance),
        "permutation_p_value": (at_least + 1) / (n_perm + 1) if n_perm else None,
        "permutations": n_perm,
        "group_mean_count": mean_count,
        "group_confusion": group_conf.long().tolist(),
        "cross_toward_head": int(toward_head),
        "cross_toward_tail": int(toward_tail),
        "cross_toward_head_share": share(toward_head, toward_head + toward_tail),
        "errors_toward_more_frequent_class_share": share(to_more, to_more + to_fewer),
        "frequency_flow": flow,
        "tail_predicted_as_head": flow["tail"]["head"],
        "head_predicted_as_tail": flow["head"]["tail"],
    }
    if tested > 0 and sum(pred_counts) > 0:
        result.update(bias_measures(per_class, counts, pred_counts, many, few))
    if grouping.method != "frequency":
        from sklearn.metrics import adjusted_rand_score
        result["agreement_with_frequency_ari"] = float(adjusted_rand_score(freq.group_of().numpy(),
                                                                           group_of.numpy()))
    result["circular"] = bool(circular)
    result["verdict"] = _verdict(result, circular)
    return result


def _verdict(r: dict, circular: bool = False) -> str:
    if not r["errors"]:
        return "no errors: nothing to say about the grouping hypothesis"
    p, lift = r["permutation_p_value"], r["within_group_lift"]
    supported = p is not None and p < 0.05 and lift is not None and lift > 1
    parts = [f"{100 * r['within_group_share']:.0f}% of errors stay inside a group against "
             f"{100 * r['within_group_share_chance']:.0f}% by chance (x{lift:.2f}, permutation p={p:.3g}): "
             + ("errors concentrate inside the groups" if supported else "errors do not concentrate inside the groups")]
    if r["cross_toward_head_share"] is not None:
        parts.append(f"{100 * r['cross_toward_head_share']:.0f}% of cross-group errors go toward the more frequent group")
    parts.append(f"tail predicted as head {r['tail_predicted_as_head']}, head predicted as tail "
                 f"{r['head_predicted_as_tail']}")
    if circular:
        parts.append("caution: the groups were learned from this same confusion, so the within-group share is "
                     "inflated by construction")
    return "; ".join(parts)


def format_analysis(r: dict, title: str = "") -> str:
    names = r["grouping"]["names"]
    lines = [title] if title else []
    lines.append(f"grouping {r['grouping']['method']}" + (f" ({r['grouping']['source']})" if r["grouping"]["source"] else ""))
    for name, grp, mean in zip(names, r["grouping"]["groups"], r["group_mean_count"]):
        lines.append(f"  {name:<8} classes {grp}  (mean training count {mean:.1f})")
    acc = "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f}%"
    lines.append(f"test accuracy {acc}, {r['errors']} errors: {r['within_group_errors']} inside groups, "
                 f"{r['cross_group_errors']} across ({r['cross_toward_head']} toward head, "
                 f"{r['cross_toward_tail']} toward tail)")
    if "agreement_with_frequency_ari" in r:
        lines.append(f"agreement with the frequency grouping (adjusted Rand index): {r['agreement_with_frequency_ari']:.2f}")
    lines.append(r["verdict"])
    return "\n".join(lines)
