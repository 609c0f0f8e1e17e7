# Quantitative maps: brain mask and MPPCA denoising, dictionary (cached per sequence timing), matching.


# brain mask of the MRF series (which the denoising is restricted to) and MPPCA denoising: one job
rule denoise:
    input:
        mrf=planned(lambda wc: PLAN.subjects[wc.stem].files["mrf"]),
        checked=f"{WORK}/inputs/{{stem}}_inputs.json",
    output:
        mask=f"{OUT}/{{stem}}_acq-MRFEPI_desc-brain_mask.nii.gz",
        denoised=f"{OUT}/{{stem}}_acq-MRFEPI_desc-denoised_MRF.nii.gz",
        sigma=f"{OUT}/{{stem}}_acq-MRFEPI_desc-mppca_noisemap.nii.gz",
    params:
        cfg=config["denoise"],
    threads: 2
    resources:
        mem_mb=mem_per_attempt(4000),
    benchmark:
        f"{WORK}/benchmarks/denoise/{{stem}}.tsv",
    log:
        f"{WORK}/logs/denoise/{{stem}}.log",
    conda:
        "../envs/denoise.yaml"
    script:
        "../scripts/denoise.py"


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


rule match:
    input:
        unpack(planned(lambda wc: {"sidecar": PLAN.subjects[wc.stem].sidecar,
                                   "dictionary": f"{WORK}/dictionaries/mrfdict_{PLAN.timing[wc.stem]}.npz"})),
        mrf=f"{OUT}/{{stem}}_acq-MRFEPI_desc-denoised_MRF.nii.gz",
        mask=f"{OUT}/{{stem}}_acq-MRFEPI_desc-brain_mask.nii.gz",
    output:
        T1=f"{OUT}/{{stem}}_acq-MRFEPI_T1map.nii.gz",
        T2star=f"{OUT}/{{stem}}_acq-MRFEPI_T2starmap.nii.gz",
        B1=f"{OUT}/{{stem}}_acq-MRFEPI_TB1map.nii.gz",
        M0=f"{OUT}/{{stem}}_acq-MRFEPI_M0map.nii.gz",
        quality=f"{OUT}/{{stem}}_acq-MRFEPI_desc-match_quality.nii.gz",
    params:
        cfg=config["matching"],
    threads: 2
    resources:
        mem_mb=mem_per_attempt(6000),
    benchmark:
        f"{WORK}/benchmarks/match/{{stem}}.tsv",
    log:
        f"{WORK}/logs/match/{{stem}}.log",
    conda:
        "../envs/qmri.yaml"
    script:
        "../scripts/match.py"
