"""The second distiller: uni-level statistics matching with unbiased recovery and relabelling (METHOD section 11).

    debias       the debiased experts' loss: mixture consistency + the scheduled class-rebalanced cross-entropy
    experts      the observer and the teacher (BN networks), trained with it: `ltdd experts --recipe debiased`
    statistics   fair BN recalibration: per-class statistics at every BN input, their class-balanced target
    initialise   confidence-guided multi-round initialisation from teacher-scored crops
    recovery     Recovery: the pixels matched to the statistics, then relabelled by the teacher
                 (`ltdd distill ... method=unilevel`)

Sits beside distill (it is the same stage of the pipeline): may import the layers below it (ops, models, augment,
data, synset, config, evaluate, files, distributed), never distill, matching or trajectories.
"""
from .debias import debias_loss, debias_schedule, rebalance_weights, robust_loss
from .experts import DebiasConfig, ExpertStore, train_debiased
from .initialise import initialise, multi_round_pick
from .recovery import Recovery, stats_loss
from .statistics import FairStatistics, balanced_target, fair_statistics

__all__ = ["DebiasConfig", "ExpertStore", "FairStatistics", "Recovery", "balanced_target", "debias_loss",
           "debias_schedule", "fair_statistics", "initialise", "multi_round_pick", "rebalance_weights",
           "robust_loss", "stats_loss", "train_debiased"]
