# Registration to the T2w image, one job per subject: the MRF T1 map (rigid, then a phase-encode-restricted
# SyN stage when registration.phase_encode_stage) carrying the maps, the MRF series and the brain mask, and
# beside it the FLAIR image (rigid); then, where the subject has one, the manual lesion mask (FLAIR grid)
# with the FLAIR transform (rule register_lesion: apply mode may lack the mask).

_PE_STAGE = bool(config["registration"]["phase_encode_stage"])
# the PE warp and its inverse exist only with the PE stage (the xfm JSON lists what was used)
_NO_PE_OUTPUTS = () if _PE_STAGE else ("warp", "inverse_warp")
# the lesion mask in T2w space: rule register_lesion
_REGISTER_OUTPUTS = derivatives("register", OUT, omit=(*_NO_PE_OUTPUTS, "lesion"))


rule register:
    input:
        unpack(raw_inputs("mrf", "t2w", "flair")),
        T1=derivative("qmri", "T1", OUT),
    output:
        # rigid, xfm_json, [warp, inverse_warp], T1, T2star, B1, M0, MRF, mask, flair_xfm, flair
        # (mrflesion.layout.DERIVATIVES["register"])
        **_REGISTER_OUTPUTS,
    params:
        # written by the qmri job with T1
        siblings=siblings(**derivatives("qmri", OUT, keys=("T2star", "B1", "M0", "mask"))),
        cfg=config["registration"],
    # two threads: the MRF and FLAIR registrations side by side, each with single-threaded ANTs (ANTs with
    # more threads is not reproducible run to run, tests/test_resume.py); one thread: one after the other
    threads: 2
    resources:
        mem_mb=mem_per_attempt(4000),
    benchmark:
        file(WORK_FILES, "benchmark", WORK, step="register"),
    log:
        f"{WORK}/logs/register/{{stem}}.log",
    conda:
        "../envs/registration.yaml"
    script:
        "../scripts/register.py"


rule register_lesion:
    input:
        unpack(raw_inputs("lesion", "t2w")),
        flair_xfm=derivative("register", "flair_xfm", OUT),
    output:
        derivative("register", "lesion", OUT),
    threads: 1
    resources:
        mem_mb=mem_per_attempt(2000),
    log:
        f"{WORK}/logs/register_lesion/{{stem}}.log",
    conda:
        "../envs/registration.yaml"
    script:
        "../scripts/register_lesion.py"
