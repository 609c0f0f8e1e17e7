# Inference and per-subject evaluation with the HTML report (one job per subject), and the group's per-site
# tables. See mrflesion.plan.evaluation and mrflesion.steps.evaluation / .group.
from mrflesion.plan.evaluation import EvaluationPlan

EVAL = EvaluationPlan(PLAN, TRAINING, config, OUT, WORK)


# One job per subject: every trained network applied to the subject (a few seconds on a CPU), then its
# evaluation and report.
rule evaluate_subject:
    input:
        unpack(planned(lambda wc: EVAL.evaluate_inputs(wc.stem))),
    output:
        **EVAL.network_outputs("{stem}"),
        **EVAL.subject_outputs("{stem}"),
    params:
        info=planned(lambda wc: EVAL.evaluate_params(wc.stem)),
        # what changes a subject's results: the inference device (and threads) and the run's configuration
        # (provenance) are read by the rule body from snakemake.config, so changing them reruns nothing
        # (tests/test_rerun_settings.py); evaluation.summary_splits is the group job's
        inference={k: v for k, v in config["inference"].items() if k not in ("device", "threads")},
        cfg={k: config["evaluation"][k] for k in ("threshold", "tissue_threshold")},
        lesion_table=config["lesion_table"],
    threads: int(config["inference"]["threads"])
    resources:
        mem_mb=mem_per_attempt(3000),
    log:
        f"{WORK}/logs/evaluate/{{stem}}.log",
    conda:
        "../envs/evaluate.yaml"
    script:
        "../scripts/evaluate_subject.py"


rule group_evaluation:
    input:
        inputs=file(COHORT, "inputs", OUT),
        # the split (none in apply mode: every subject is new to the networks)
        **({} if APPLY else {"splits": file(COHORT, "splits", OUT)}),
        # one output per subject's evaluation job (its metrics and curves tables, written by the same
        # job, are params: fewer declared files keep planning a large cohort fast)
        json=[EVAL.subject_outputs(s)["json"] for s in EVAL.stems],
    output:
        # metrics, summary, site_tests, network_tests, failed, times, lesions, lesion_sites, report
        **files(GROUP_EVALUATION, OUT),
    params:
        metrics=[EVAL.subject_outputs(s)["metrics"] for s in EVAL.stems],
        curves=[EVAL.subject_outputs(s)["curves"] for s in EVAL.stems],
        quant=[EVAL.subject_outputs(s)["quant"] for s in EVAL.stems],
        splits=EVAL.summary_splits(),
        networks=list(EVAL.networks),
        refused=EVAL.refused_rows(),
        # the threshold the report names (the run's configuration, provenance: snakemake.config)
        threshold=config["evaluation"]["threshold"],
    log:
        f"{WORK}/logs/group_evaluation.log",
    conda:
        "../envs/evaluate.yaml"
    script:
        "../scripts/group_evaluation.py"
