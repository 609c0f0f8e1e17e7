# New and enlarging lesions between two sessions (Krüger et al. 2020; docs/longitudinal.md): for every
# baseline/follow-up pair of the cohort, both FLAIRs in a halfway space, a siamese 3D network trained on
# the training pairs and a subtraction comparator, both evaluated lesion-wise on the follow-up's FLAIR grid.
#
#   snakemake --cores 2 --configfile config.yaml config/longitudinal.yaml -- longitudinal   # the demo
#
# Pairs are the follow-up sessions' stems ({stem}); the split is the cohort's (training.split). Resumable
# state: {WORK}/train/longitudinal/<network>/ (delete it to retrain from scratch).
from mrflesion.plan.longitudinal import LongitudinalPlan

LONG = LongitudinalPlan(PLAN, config, OUT, WORK, apply_mode=APPLY)
_LCFG = config["longitudinal"]
_LFILES = {k: file(LONGITUDINAL, k, OUT, network=LONG.network) for k in LONGITUDINAL}


if LONG.enabled:

    rule longitudinal_prepare:
        input:
            baseline=planned(lambda wc: LONG.pairs[wc.stem].flair_baseline),
            followup=planned(lambda wc: LONG.pairs[wc.stem].flair_followup),
        output:
            # baseline, followup, brain (halfway space), xfm (mrflesion.layout.DERIVATIVES["longitudinal"])
            **LONG.prepared("{stem}"),
        params:
            pair=planned(lambda wc: LONG.pair_id(wc.stem)),
        threads: 1
        resources:
            mem_mb=mem_per_attempt(2000),
        log:
            f"{WORK}/logs/longitudinal/prepare/{{stem}}.log",
        conda:
            "../envs/registration.yaml"
        script:
            "../scripts/longitudinal_prepare.py"


    rule longitudinal_target:
        input:
            reference=planned(lambda wc: LONG.pairs[wc.stem].reference),
            xfm=derivative("longitudinal", "xfm", OUT),
            flair_followup=planned(lambda wc: LONG.pairs[wc.stem].flair_followup),
        output:
            derivative("longitudinal", "target", OUT),
        params:
            pair=planned(lambda wc: LONG.pair_id(wc.stem)),
        threads: 1
        log:
            f"{WORK}/logs/longitudinal/target/{{stem}}.log",
        conda:
            "../envs/registration.yaml"
        script:
            "../scripts/longitudinal_target.py"


    rule longitudinal_baseline_lesions:
        input:
            lesion=planned(lambda wc: LONG.pairs[wc.stem].lesion_baseline),
            xfm=derivative("longitudinal", "xfm", OUT),
            flair_baseline=planned(lambda wc: LONG.pairs[wc.stem].flair_baseline),
            flair_followup=planned(lambda wc: LONG.pairs[wc.stem].flair_followup),
        output:
            derivative("longitudinal", "lesion_baseline", OUT),
        params:
            pair=planned(lambda wc: LONG.pair_id(wc.stem)),
        threads: 1
        log:
            f"{WORK}/logs/longitudinal/baseline_lesions/{{stem}}.log",
        conda:
            "../envs/registration.yaml"
        script:
            "../scripts/longitudinal_lesion_baseline.py"


    # the comparator's thresholds: pooled lesion-wise F1 over the training and validation pairs
    rule longitudinal_comparator:
        input:
            [f for s in LONG.stems("train", True) + LONG.stems("val", True) for f in LONG.training_files(s).values()],
        output:
            _LFILES["comparator"],
        params:
            pairs=[LONG.training_files(s) for s in LONG.stems("train", True) + LONG.stems("val", True)],
            ids=[LONG.pair_id(s) for s in LONG.stems("train", True) + LONG.stems("val", True)],
            cfg=_LCFG["comparator"],
        threads: 1
        log:
            f"{WORK}/logs/longitudinal/comparator.log",
        conda:
            "../envs/evaluate.yaml"
        script:
            "../scripts/longitudinal_comparator.py"


    rule longitudinal_train:
        input:
            [f for s in LONG.stems("train", True) + LONG.stems("val", True) for f in LONG.training_files(s).values()],
            # the single time points of the encoder's pre-training (network.pretrain_epochs > 0)
            [f for d in LONG.pretrain_sessions() for f in (d["flair"], d["lesion"])],
        output:
            best=_LFILES["best"],
            history=_LFILES["history"],
        params:
            spec=_LCFG["network"],
            train_files=[LONG.training_files(s) for s in LONG.stems("train", True)],
            train_ids=[LONG.pair_id(s) for s in LONG.stems("train", True)],
            val_files=[LONG.training_files(s) for s in LONG.stems("val", True)],
            val_ids=[LONG.pair_id(s) for s in LONG.stems("val", True)],
            state_dir=file(WORK_FILES, "longitudinal_state", WORK, network=LONG.network),
            pretrain=LONG.pretrain_sessions(),
            # CPU training is deterministic for a given thread count, not across counts: a new count retrains
            threads=int(_LCFG["threads"]),
        threads: int(_LCFG["threads"])
        resources:
            mem_mb=int(_LCFG["mem_mb"]),
            runtime=int(_LCFG["runtime_min"]),
        log:
            f"{WORK}/logs/longitudinal/train_{LONG.network}.log",
        conda:
            "../envs/learn.yaml"
        script:
            "../scripts/longitudinal_train.py"


    rule longitudinal_evaluate:
        input:
            unpack(planned(lambda wc: LONG.evaluate_inputs(wc.stem))),
        output:
            **LONG.method_outputs("{stem}"),
            **LONG.evaluation_outputs("{stem}"),
        params:
            pair=planned(lambda wc: {**LONG.pairs[wc.stem].to_dict(), "pair": LONG.pair_id(wc.stem),
                                     "split": LONG.split(wc.stem),
                                     "reference_name": "phantom truth" if LONG.phantom else "manual mask"}),
            network=LONG.network,
        threads: 1
        resources:
            mem_mb=mem_per_attempt(3000),
        log:
            f"{WORK}/logs/longitudinal/evaluate/{{stem}}.log",
        conda:
            "../envs/evaluate.yaml"
        script:
            "../scripts/longitudinal_evaluate.py"


    rule longitudinal_group:
        input:
            metrics=[LONG.evaluation_outputs(s)["metrics"] for s in LONG.stems()],
        output:
            **{k: _LFILES[k] for k in ("pairs", "metrics", "summary", "tests", "report")},
        params:
            pairs=LONG.rows(),
            unpaired=LONG.unpaired,
            split=config["evaluation"]["summary_splits"][0] if config["evaluation"].get("summary_splits") else "test",
        threads: 1
        log:
            f"{WORK}/logs/longitudinal/group.log",
        conda:
            "../envs/evaluate.yaml"
        script:
            "../scripts/longitudinal_group.py"


rule longitudinal:
    input:
        LONG.targets(),
