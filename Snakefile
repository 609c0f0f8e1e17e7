# mrflesion: MS lesion probability mapping from MR fingerprinting.
#
#   snakemake --cores 2                     # the digital phantom demo (config.yaml defaults)
#   snakemake --cores 2 --config bids_dir=/data/bids output_dir=/data/derivatives/mrflesion
#   mrflesion /data/bids /data/derivatives/mrflesion participant   # the same through the BIDS-app CLI
#
# The logic lives in the mrflesion package (src/mrflesion); rules only connect files.

import gc
import os
import sys

from snakemake.utils import min_version

min_version("9.0")


configfile: os.path.join(workflow.basedir, "config.yaml")


include: "rules/config.smk"


include: "rules/common.smk"
include: "rules/train.smk"
include: "rules/evaluate.smk"
include: "rules/longitudinal.smk"
include: "rules/phantom.smk"
include: "rules/inputs.smk"
include: "rules/qmri.smk"
include: "rules/registration.smk"
include: "rules/tissue.smk"
include: "rules/group.smk"


# Networks are trained, applied and evaluated when the cohort's split allows it; otherwise the main
# job stops after the conventional chain and says why (one line).
if TRAINING.problem():
    print(f"mrflesion: no network training or evaluation: {TRAINING.problem()}", file=sys.stderr)


rule all:
    default_target: True
    input:
        # the group evaluation depends on every subject's evaluation job (reports included), which
        # depends on every participant-level output (listing those as well would only lengthen the
        # plan of a large cohort)
        # (in apply mode every subject's chain, also of a subject whose inference is refused)
        rules.participant.input if TRAINING.problem() or APPLY else [],
        rules.group.input,
        [] if TRAINING.problem() or APPLY else rules.train.input,
        [] if TRAINING.problem() else rules.group_evaluation.output,
        # new and enlarging lesions, when the cohort has pairs of sessions (rules/longitudinal.smk)
        LONG.targets(),


# Planning a large cohort allocates millions of small objects, and Python's default cyclic-GC
# thresholds (a collection every 700 allocations, rescanning what parsing built) cost 15-20 % of the
# plan of 1,000 subjects. The parsed workflow lives as long as the run: freeze it, and collect less
# often (benchmarks/bench_dag.py).
gc.freeze()
gc.set_threshold(50_000, 20, 100)
