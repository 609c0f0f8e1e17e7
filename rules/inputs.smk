# Content-level check of each subject's inputs (one clear error naming subject and file).


rule check_inputs:
    input:
        unpack(input_files),
    output:
        f"{WORK}/inputs/{{stem}}_inputs.json",
    params:
        key=planned(lambda wc: PLAN.subjects[wc.stem].key),
        n_measurements=config["mrf_measurements"],
        record=planned(lambda wc: failure_record_path(WORK, wc.stem)),
    benchmark:
        f"{WORK}/benchmarks/check_inputs/{{stem}}.tsv",
    log:
        f"{WORK}/logs/check_inputs/{{stem}}.log",
    conda:
        "../envs/inputs.yaml"
    script:
        "../scripts/check_inputs.py"
