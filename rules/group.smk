# Dataset-level outputs: the derivatives' dataset_description.json and the cohort tables.


rule dataset_description:
    output:
        f"{OUT}/dataset_description.json",
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
        f"{OUT}/dataset_description.json",
        expand(f"{WORK}/inputs/{{stem}}_inputs.json", stem=STEMS),
        expand(f"{OUT}/{{stem}}_acq-MRFEPI_T1map.nii.gz", stem=STEMS),
        expand(f"{OUT}/{{stem}}_acq-MRFEPI_space-T2w_MRF.nii.gz", stem=STEMS),
        expand(f"{OUT}/{{stem}}_space-T2w_label-NAWM_probseg.nii.gz", stem=STEMS),
        # apply mode: the trained networks applied, each subject's evaluation, per-lesion table and report
        [EVAL.subject_outputs(s)["report"] for s in EVAL.stems] if APPLY else [],


rule group_inputs:
    input:
        checks=expand(f"{WORK}/inputs/{{stem}}_inputs.json", stem=STEMS),
    output:
        f"{OUT}/group/inputs.tsv",
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
        f"{OUT}/dataset_description.json",
        f"{OUT}/group/inputs.tsv",
        # apply mode: the cohort's per-site tables (metrics, per-lesion) and the group report
        rules.group_evaluation.output if APPLY else [],
