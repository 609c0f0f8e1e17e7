# Parse-time plan: subjects, input paths and file stems (see mrflesion.workflow).
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from mrflesion.workflow import STEM_REGEX, failure_record_path, make_plan

PLAN = make_plan(config)
OUT = config["output_dir"].rstrip("/")
WORK = config["work_dir"].rstrip("/")
STEMS = PLAN.stems()


wildcard_constraints:
    stem=STEM_REGEX,


def subject_inputs(wildcards):
    return PLAN.subjects[wildcards.stem]


def input_files(wildcards):
    s = PLAN.subjects[wildcards.stem]
    return {**s.files, "sidecar": s.sidecar}
