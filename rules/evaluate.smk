# Inference (one job per subject running every network, outputs in T2w space), per-subject evaluation with the
# HTML report, and the group's per-site tables. See mrflesion.evaluate_steps.
from mrflesion.evaluate_steps import EvaluationPlan

EVAL = EvaluationPlan(PLAN, TRAINING, config, OUT, WORK)


rule infer:
    input:
        unpack(planned(lambda wc: EVAL.infer_inputs(wc.stem))),
    output:
        **EVAL.infer_outputs("{stem}"),
    params:
        subject=planned(lambda wc: EVAL.infer_params(wc.stem)),
        networks=EVAL.networks,
        cfg=config["inference"],
    threads: int(config["inference"]["threads"])
    resources:
        mem_mb=mem_per_attempt(3000),
    log:
        f"{WORK}/logs/infer/{{stem}}.log",
    conda:
        "../envs/learn.yaml"
    script:
        "../scripts/infer.py"


rule evaluate_subject:
    input:
        unpack(planned(lambda wc: EVAL.evaluate_inputs(wc.stem))),
    output:
        **EVAL.subject_outputs("{stem}"),
    params:
        info=planned(lambda wc: EVAL.evaluate_params(wc.stem)),
        cfg=config["evaluation"],
        config=config,
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
        splits=f"{OUT}/group/splits.tsv",
        metrics=[EVAL.subject_outputs(s)["metrics"] for s in STEMS],
        json=[EVAL.subject_outputs(s)["json"] for s in STEMS],
        curves=[EVAL.subject_outputs(s)["curves"] for s in STEMS],
    output:
        metrics=f"{OUT}/group/metrics.tsv",
        summary=f"{OUT}/group/summary_sites.tsv",
        site_tests=f"{OUT}/group/tests_sites.tsv",
        network_tests=f"{OUT}/group/tests_networks.tsv",
        failed=f"{OUT}/group/failed.tsv",
        times=f"{OUT}/group/times.tsv",
        report=f"{OUT}/group/report.html",
    params:
        splits=config["evaluation"]["summary_splits"],
        config=config,
    log:
        f"{WORK}/logs/group_evaluation.log",
    conda:
        "../envs/evaluate.yaml"
    script:
        "../scripts/group_evaluation.py"
