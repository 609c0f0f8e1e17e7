# Registration to the T2w image, one job per subject: the MRF T1 map (rigid, then a phase-encode-restricted
# SyN stage when registration.phase_encode_stage) carrying the maps, the MRF series and the brain mask, and
# beside it the FLAIR image (rigid) carrying the manual lesion mask.

_PE_STAGE = bool(config["registration"]["phase_encode_stage"])
_XFM = f"{OUT}/{{stem}}_from-MRF_to-T2w_mode-image"
# the PE warp and its inverse exist only with the PE stage (the xfm JSON lists what was used)
_PE_OUTPUTS = (
    {
        "warp": f"{_XFM}_desc-pewarp_xfm.nii.gz",
        "inverse_warp": f"{OUT}/{{stem}}_from-T2w_to-MRF_mode-image_desc-pewarp_xfm.nii.gz",
    }
    if _PE_STAGE
    else {}
)


rule register:
    input:
        unpack(raw_inputs("mrf", "t2w", "flair", "lesion")),
        T1=f"{OUT}/{{stem}}_acq-MRFEPI_T1map.nii.gz",
    output:
        rigid=f"{_XFM}_desc-rigid_xfm.mat",
        xfm_json=f"{_XFM}_xfm.json",
        **_PE_OUTPUTS,
        T1=f"{OUT}/{{stem}}_acq-MRFEPI_space-T2w_T1map.nii.gz",
        T2star=f"{OUT}/{{stem}}_acq-MRFEPI_space-T2w_T2starmap.nii.gz",
        B1=f"{OUT}/{{stem}}_acq-MRFEPI_space-T2w_TB1map.nii.gz",
        M0=f"{OUT}/{{stem}}_acq-MRFEPI_space-T2w_M0map.nii.gz",
        MRF=f"{OUT}/{{stem}}_acq-MRFEPI_space-T2w_MRF.nii.gz",
        mask=f"{OUT}/{{stem}}_space-T2w_desc-brain_mask.nii.gz",
        flair_xfm=f"{OUT}/{{stem}}_from-FLAIR_to-T2w_mode-image_xfm.mat",
        lesion=f"{OUT}/{{stem}}_space-T2w_label-lesion_mask.nii.gz",
        flair=f"{OUT}/{{stem}}_space-T2w_FLAIR.nii.gz",
    params:
        # written by the qmri job with T1
        siblings=siblings(
            T2star=f"{OUT}/{{stem}}_acq-MRFEPI_T2starmap.nii.gz",
            B1=f"{OUT}/{{stem}}_acq-MRFEPI_TB1map.nii.gz",
            M0=f"{OUT}/{{stem}}_acq-MRFEPI_M0map.nii.gz",
            mask=f"{OUT}/{{stem}}_acq-MRFEPI_desc-brain_mask.nii.gz",
        ),
        cfg=config["registration"],
    # two threads: the MRF and FLAIR registrations side by side, each with single-threaded ANTs (ANTs with
    # more threads is not reproducible run to run, tests/test_resume.py); one thread: one after the other
    threads: 2
    resources:
        mem_mb=mem_per_attempt(4000),
    benchmark:
        f"{WORK}/benchmarks/register/{{stem}}.tsv",
    log:
        f"{WORK}/logs/register/{{stem}}.log",
    conda:
        "../envs/registration.yaml"
    script:
        "../scripts/register.py"
