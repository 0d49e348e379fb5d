"""`ltdd calibrate`: ADSA's soft-label calibration of a synthetic set (any method's), written as a new set."""
import sys

from ..errors import ConfigError
from ..files import check_output_file, write_json_atomic


def run(args):
    from ..calibration import calibrate_record
    from ..files import save_torch_atomic
    from ..synset import load_synset, synset_classes

    check_output_file(args.output, "--out")
    if str(args.output) == str(args.synset):
        raise ConfigError("--out must differ from --synset: the uncalibrated set is kept")
    record = load_synset(args.synset)
    calibrated, summary = calibrate_record(record, synset_classes(record))
    save_torch_atomic(args.output, calibrated)
    print(f"calibrated {args.synset} -> {args.output}: tau {summary['tau']:.4f}, variance of the per-class mean "
          f"confidence {summary['variance_before']:.3g} -> {summary['variance_after']:.3g}, labels naming their "
          f"image's class {100 * summary['agree_before']:.0f}% -> {100 * summary['agree_after']:.0f}%")
    if summary["warning"]:
        print(f"ltdd calibrate: warning: {summary['warning']}", file=sys.stderr)
    if args.json:
        write_json_atomic(args.json, summary)


def add_parser(sub):
    p = sub.add_parser("calibrate", help="adjust a synthetic set's soft labels (ADSA logit calibration)",
                       description="Fit one scalar logit adjustment tau of a synthetic set's soft labels, z - tau "
                                   "log(prior), that minimises the variance of the per-class mean confidence, and "
                                   "write the adjusted set (METHOD section 11). Works on any method's set with soft "
                                   "labels.")
    p.add_argument("--synset", required=True, help="the synthetic-set file to calibrate")
    p.add_argument("--out", dest="output", required=True, help="where to write the calibrated set")
    p.add_argument("--json", default=None, help="write tau and the variances as JSON here")
    p.set_defaults(run=run)
