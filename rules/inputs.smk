# Content-level check of each subject's inputs (one clear error naming subject and file).
from mrflesion.validate import stated_timing


rule check_inputs:
    input:
        unpack(input_files),
        # every MRF sidecar that applies (BIDS inheritance: dataset, subject, session level, beside the series)
        sidecars=planned(lambda wc: list(PLAN.subjects[wc.stem].sidecar_layers)),
    output:
        file(WORK_FILES, "inputs", WORK),
    params:
        key=planned(lambda wc: PLAN.subjects[wc.stem].key),
        n_measurements=config["mrf_measurements"],
        stated=stated_timing(config),
        record=planned(lambda wc: failure_record_path(WORK, wc.stem)),
    benchmark:
        file(WORK_FILES, "benchmark", WORK, step="check_inputs"),
    log:
        f"{WORK}/logs/check_inputs/{{stem}}.log",
    conda:
        "../envs/inputs.yaml"
    script:
        "../scripts/check_inputs.py"
