# SPM-style tissue probabilities (GM, WM, CSF; NAWM = WM outside the lesion mask) in T2w space,
# from the registered T1 map with MNI152 priors; then the classical lesion baseline (mrflesion.baseline:
# outliers of T1 and T2* against the subject's own white matter, no deep learning, no manual mask).


rule tissue:
    input:
        unpack(lesion_t2w),  # NAWM excludes it
        T1=derivative("register", "T1", OUT),
    output:
        # GM, WM, CSF, NAWM, baseline (mrflesion.layout.DERIVATIVES["tissue"])
        **derivatives("tissue", OUT),
    params:
        # written by the registration job with T1
        siblings=siblings(**derivatives("register", OUT, keys=("T2star", "mask"))),
        cfg=config["tissue"],
    # one thread: ANTs registration with more threads is not reproducible run to run (tests/test_resume.py)
    threads: 1
    resources:
        mem_mb=mem_per_attempt(4000),
    benchmark:
        file(WORK_FILES, "benchmark", WORK, step="tissue"),
    log:
        f"{WORK}/logs/tissue/{{stem}}.log",
    conda:
        "../envs/tissue.yaml"
    script:
        "../scripts/tissue.py"
