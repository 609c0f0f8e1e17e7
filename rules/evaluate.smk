# Inference and per-subject evaluation with the HTML report (one job per subject), and the group's per-site
# tables. See mrflesion.evaluate_steps.
from mrflesion.evaluate_steps import EvaluationPlan

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
        inference=config["inference"],
        cfg=config["evaluation"],
        lesion_table=config["lesion_table"],
        config=config,
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
        inputs=f"{OUT}/group/inputs.tsv",
        # the split (none in apply mode: every subject is new to the networks)
        **({} if APPLY else {"splits": f"{OUT}/group/splits.tsv"}),
        # one output per subject's evaluation job (its metrics and curves tables, written by the same
        # job, are params: fewer declared files keep planning a large cohort fast)
        json=[EVAL.subject_outputs(s)["json"] for s in EVAL.stems],
    output:
        metrics=f"{OUT}/group/metrics.tsv",
        summary=f"{OUT}/group/summary_sites.tsv",
        site_tests=f"{OUT}/group/tests_sites.tsv",
        network_tests=f"{OUT}/group/tests_networks.tsv",
        failed=f"{OUT}/group/failed.tsv",
        times=f"{OUT}/group/times.tsv",
        lesions=f"{OUT}/group/lesions.tsv",
        lesion_sites=f"{OUT}/group/lesions_sites.tsv",
        report=f"{OUT}/group/report.html",
    params:
        metrics=[EVAL.subject_outputs(s)["metrics"] for s in EVAL.stems],
        curves=[EVAL.subject_outputs(s)["curves"] for s in EVAL.stems],
        quant=[EVAL.subject_outputs(s)["quant"] for s in EVAL.stems],
        splits=EVAL.summary_splits(),
        networks=list(EVAL.networks),
        refused=EVAL.refused_rows(),
        config=config,
    log:
        f"{WORK}/logs/group_evaluation.log",
    conda:
        "../envs/evaluate.yaml"
    script:
        "../scripts/group_evaluation.py"
