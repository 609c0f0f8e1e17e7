# Quantitative maps: the dictionary (cached per sequence timing); per subject the brain mask, MPPCA denoising
# and dictionary matching.


rule dictionary:
    output:
        file(WORK_FILES, "dictionary", WORK),
    params:
        sidecar=planned(lambda wc: PLAN.protocols[wc.timing]),
        cfg=config["dictionary"],
    threads: 2
    log:
        f"{WORK}/logs/dictionary/{{timing}}.log",
    conda:
        "../envs/qmri.yaml"
    script:
        "../scripts/dictionary.py"


# One job per subject: the brain mask of the MRF series, MPPCA denoising restricted to it, and dictionary
# matching of the denoised series (the dictionary of the subject's sequence timing is the job above).
rule qmri:
    input:
        unpack(planned(lambda wc: {"mrf": PLAN.subjects[wc.stem].files["mrf"],
                                   "sidecar": PLAN.subjects[wc.stem].sidecar,
                                   "dictionary": file(WORK_FILES, "dictionary", WORK, timing=PLAN.timing[wc.stem])})),
        checked=file(WORK_FILES, "inputs", WORK),
    output:
        # mask, denoised, sigma, T1, T2star, B1, M0, quality (mrflesion.layout.DERIVATIVES["qmri"])
        **derivatives("qmri", OUT),
    params:
        # what changes results: the devices and the matching block size are read by the rule body from
        # snakemake.config, so changing them reruns nothing (tests/test_rerun_settings.py)
        denoise={k: v for k, v in config["denoise"].items() if k != "device"},
        matching={k: v for k, v in config["matching"].items() if k not in ("device", "block_voxels")},
    threads: 2
    resources:
        mem_mb=mem_per_attempt(6000),
    benchmark:
        file(WORK_FILES, "benchmark", WORK, step="qmri"),
    log:
        f"{WORK}/logs/qmri/{{stem}}.log",
    conda:
        "../envs/qmri.yaml"
    script:
        "../scripts/qmri.py"
