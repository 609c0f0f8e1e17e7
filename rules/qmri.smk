# Quantitative maps: the dictionary (cached per sequence timing); per subject the brain mask, MPPCA denoising
# and dictionary matching.


rule dictionary:
    output:
        f"{WORK}/dictionaries/mrfdict_{{timing}}.npz",
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
                                   "dictionary": f"{WORK}/dictionaries/mrfdict_{PLAN.timing[wc.stem]}.npz"})),
        checked=f"{WORK}/inputs/{{stem}}_inputs.json",
    output:
        mask=f"{OUT}/{{stem}}_acq-MRFEPI_desc-brain_mask.nii.gz",
        denoised=f"{OUT}/{{stem}}_acq-MRFEPI_desc-denoised_MRF.nii.gz",
        sigma=f"{OUT}/{{stem}}_acq-MRFEPI_desc-mppca_noisemap.nii.gz",
        T1=f"{OUT}/{{stem}}_acq-MRFEPI_T1map.nii.gz",
        T2star=f"{OUT}/{{stem}}_acq-MRFEPI_T2starmap.nii.gz",
        B1=f"{OUT}/{{stem}}_acq-MRFEPI_TB1map.nii.gz",
        M0=f"{OUT}/{{stem}}_acq-MRFEPI_M0map.nii.gz",
        quality=f"{OUT}/{{stem}}_acq-MRFEPI_desc-match_quality.nii.gz",
    params:
        denoise=config["denoise"],
        matching=config["matching"],
    threads: 2
    resources:
        mem_mb=mem_per_attempt(6000),
    benchmark:
        f"{WORK}/benchmarks/qmri/{{stem}}.tsv",
    log:
        f"{WORK}/logs/qmri/{{stem}}.log",
    conda:
        "../envs/qmri.yaml"
    script:
        "../scripts/qmri.py"
