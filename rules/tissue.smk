# SPM-style tissue probabilities (GM, WM, CSF; NAWM = WM outside the lesion mask) in T2w space,
# from the registered T1 map with MNI152 priors; then the classical lesion baseline (mrflesion.baseline:
# outliers of T1 and T2* against the subject's own white matter, no deep learning, no manual mask).
from mrflesion.learn_steps import BASELINE_IMAGE


rule tissue:
    input:
        T1=f"{OUT}/{{stem}}_acq-MRFEPI_space-T2w_T1map.nii.gz",
    output:
        GM=f"{OUT}/{{stem}}_space-T2w_label-GM_probseg.nii.gz",
        WM=f"{OUT}/{{stem}}_space-T2w_label-WM_probseg.nii.gz",
        CSF=f"{OUT}/{{stem}}_space-T2w_label-CSF_probseg.nii.gz",
        NAWM=f"{OUT}/{{stem}}_space-T2w_label-NAWM_probseg.nii.gz",
        baseline=f"{OUT}/{BASELINE_IMAGE.format(stem='{stem}')}",
    params:
        # written by the registration job with T1
        siblings=siblings(
            T2star=f"{OUT}/{{stem}}_acq-MRFEPI_space-T2w_T2starmap.nii.gz",
            mask=f"{OUT}/{{stem}}_space-T2w_desc-brain_mask.nii.gz",
            lesion=f"{OUT}/{{stem}}_space-T2w_label-lesion_mask.nii.gz",
        ),
        cfg=config["tissue"],
    # one thread: ANTs registration with more threads is not reproducible run to run (tests/test_resume.py)
    threads: 1
    resources:
        mem_mb=mem_per_attempt(4000),
    benchmark:
        f"{WORK}/benchmarks/tissue/{{stem}}.tsv",
    log:
        f"{WORK}/logs/tissue/{{stem}}.log",
    conda:
        "../envs/tissue.yaml"
    script:
        "../scripts/tissue.py"
