# Parse-time plan: subjects, input paths and file stems (see mrflesion.plan.subjects).
import inspect
import sys
from pathlib import Path

from snakemake.common import overwrite_function_params

sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from mrflesion.layout import COHORT, GROUP_EVALUATION, LONGITUDINAL, MODELS, STEM_REGEX, WORK as WORK_FILES
from mrflesion.layout import derivative, derivatives, file, files
from mrflesion.plan.subjects import failure_record_path, make_plan

PLAN = make_plan(config)
OUT = config["output_dir"].rstrip("/")
WORK = config["work_dir"].rstrip("/")
STEMS = PLAN.stems()


wildcard_constraints:
    stem=STEM_REGEX,


def planned(fn):
    """Mark an input, params or resources function of a rule. Snakemake looks up the signature of
    each such function for each job (inspect.signature), a tenth of the planning time of a large
    cohort; this records it once."""
    overwrite_function_params(fn, inspect.signature(fn).parameters)
    return fn


# Snakemake evaluates each resource of each job through Resource.evaluate and looks up that method's
# signature every time (3 % of planning a 1,000-subject cohort); record it once, as planned() does.
try:
    from snakemake.resources import Resource

    planned(Resource.evaluate)
except (ImportError, AttributeError):  # another Snakemake layout: nothing to speed up
    pass


def siblings(**files):
    """params: files a job reads that the job producing one of its declared inputs writes as well.
    Declaring one output of each upstream job is enough: Snakemake reruns a job as a whole when any
    of its outputs is missing or out of date, and its dependants after it. The others are passed as
    params (the rule script reads both, mrflesion.steps.reads), which keeps the plan of a large
    cohort short. `files`: name -> path pattern with {stem}."""
    return planned(lambda wc: {k: v.format(stem=wc.stem) for k, v in files.items()})


def raw_inputs(*kinds):
    """Input function: the subject's BIDS files of the given kinds."""
    return planned(lambda wc: {k: PLAN.subjects[wc.stem].files[k] for k in kinds})


def mem_per_attempt(mb):
    """mem_mb resource that grows with each attempt (retries on SLURM)."""
    return planned(lambda wc, attempt: mb * attempt)


_LESION_T2W = derivative("register", "lesion", OUT)


@planned
def lesion_t2w(wildcards):
    """Input function: the manual lesion mask in T2w space, where the subject has one (apply mode may not)."""
    return {"lesion": _LESION_T2W.format(stem=wildcards.stem)} if PLAN.subjects[wildcards.stem].annotated else {}


@planned
def input_files(wildcards):
    s = PLAN.subjects[wildcards.stem]
    return {**s.files, "sidecar": s.sidecar}
