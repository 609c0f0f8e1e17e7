# Dataset-level outputs: the derivatives' dataset_description.json and the cohort tables.


rule dataset_description:
    output:
        file(COHORT, "description", OUT),
    params:
        bids_dir=PLAN.bids_dir,
    log:
        f"{WORK}/logs/dataset_description.log",
    conda:
        "../envs/inputs.yaml"
    script:
        "../scripts/dataset_description.py"


rule participant:
    input:
        file(COHORT, "description", OUT),
        expand(file(WORK_FILES, "inputs", WORK), stem=STEMS),
        expand(derivative("qmri", "T1", OUT), stem=STEMS),
        expand(derivative("register", "MRF", OUT), stem=STEMS),
        expand(derivative("tissue", "NAWM", OUT), stem=STEMS),
        # apply mode: the trained networks applied, each subject's evaluation, per-lesion table and report
        [EVAL.subject_outputs(s)["report"] for s in EVAL.stems] if APPLY else [],


rule group_inputs:
    input:
        checks=expand(file(WORK_FILES, "inputs", WORK), stem=STEMS),
    output:
        file(COHORT, "inputs", OUT),
    params:
        subjects=[PLAN.subjects[s] for s in STEMS],
        problems=PLAN.problems,
    log:
        f"{WORK}/logs/group_inputs.log",
    conda:
        "../envs/inputs.yaml"
    script:
        "../scripts/group_inputs.py"


rule group:
    input:
        file(COHORT, "description", OUT),
        file(COHORT, "inputs", OUT),
        # apply mode: the cohort's per-site tables (metrics, per-lesion) and the group report
        rules.group_evaluation.output if APPLY else [],
