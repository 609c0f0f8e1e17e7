# Network training (cohort step): subject-level splits, then one job per entry of `networks:`.
#
#   snakemake --cores 2 train                                 # every listed network (demo settings)
#   snakemake --cores 2 results/mrflesion/models/MSE-5/best.pt
#   snakemake --profile profiles/slurm --configfile config.yaml config/paper.yaml -- train   # paper
#
# The split is computed here, at parse time, so that a training job depends on its training and
# validation subjects only (test subjects never reach training or model selection); see
# mrflesion.plan.training, mrflesion.steps.training. Resumable state: {WORK}/train/<network>/ (delete it to retrain from scratch).
import re

from mrflesion.plan.training import TrainingPlan, splits_hash
from mrflesion.model_card import ApplyPlan, ModelSetError

# Apply mode (config `models`): the networks of a models directory are applied, nothing is trained
# (mrflesion.model_card); the training rules below are not defined.
APPLY = bool(config.get("models"))
if APPLY:
    try:
        TRAINING = ApplyPlan(PLAN, config, OUT)
    except ModelSetError as exc:
        raise WorkflowError(f"mrflesion: {exc}") from None
    for _line in TRAINING.refused.values():
        print(f"mrflesion: no inference for {_line}", file=sys.stderr)
else:
    TRAINING = TrainingPlan(PLAN, config, OUT)
_MODELS = file(COHORT, "models", OUT)  # the trained networks (mrflesion.layout.MODELS)



wildcard_constraints:
    network="|".join(re.escape(n) for n in TRAINING.networks) or "$^",


if not APPLY:

    rule splits:
        output:
            file(COHORT, "splits", OUT),
        params:
            rows=TRAINING.rows,
            cfg=TRAINING.cfg["split"],
            expected=splits_hash(TRAINING.splits),
        log:
            f"{WORK}/logs/splits.log",
        conda:
            "../envs/learn.yaml"
        script:
            "../scripts/splits.py"


    localrules:
        training_set,
        model_record,


    # the training and validation subjects' finished chains, once for all networks (see mrflesion.plan.training)
    rule training_set:
        input:
            TRAINING.ready_files(),
        output:
            TRAINING.training_set_record(WORK),
        params:
            subjects={split: TRAINING.subjects_all(split) for split in ("train", "val")},
        log:
            f"{WORK}/logs/train/training_set.log",
        conda:
            "../envs/learn.yaml"
        script:
            "../scripts/training_set.py"


    rule train_network:
        input:
            splits=file(COHORT, "splits", OUT),
            training_set=TRAINING.training_set_record(WORK),
        output:
            best=file(MODELS, "best", _MODELS),
            history=file(MODELS, "history", _MODELS),
            sidecar=file(MODELS, "sidecar", _MODELS),
        params:
            spec=planned(lambda wc: TRAINING.networks[wc.network]),
            # what changes results: the device (read by the rule body from snakemake.config; best.json
            # records the one used), memory and runtime rerun nothing (tests/test_rerun_settings.py)
            cfg={k: v for k, v in TRAINING.train_cfg.items() if k != "device"},
            # the thread count changes results: CPU training is deterministic for a given count, not across
            # counts (torch splits reductions by thread; a few epochs on 1 and 2 threads end with different
            # weights), so a new training.threads retrains
            threads=int(TRAINING.cfg["threads"]),
            train_subjects=planned(lambda wc: TRAINING.subjects(wc.network, "train")),
            val_subjects=planned(lambda wc: TRAINING.subjects(wc.network, "val")),
            state_dir=planned(lambda wc: file(WORK_FILES, "train_state", WORK, network=wc.network)),
        threads: int(TRAINING.cfg["threads"])
        resources:
            mem_mb=int(TRAINING.cfg["mem_mb"]),
            runtime=int(TRAINING.cfg["runtime_min"]),
        log:
            f"{WORK}/logs/train/{{network}}.log",
        conda:
            "../envs/learn.yaml"
        script:
            "../scripts/train.py"


    rule model_record:
        input:
            **{k: expand(file(MODELS, k, _MODELS), network=list(TRAINING.networks))
               for k in ("best", "history", "sidecar")},
        output:
            record=file(MODELS, "record", _MODELS),
            cards=expand(file(MODELS, "card", _MODELS), network=list(TRAINING.networks)),
        params:
            networks=list(TRAINING.networks),
            # the model cards' training cohort and MRF schedules (mrflesion.model_card; the configuration's
            # hash is the rule body's, from snakemake.config: a param would rerun on any setting)
            card=TRAINING.card_info(),
            # the classical baseline's threshold is chosen on the validation subjects too (their chains
            # are finished: the training jobs depend on the training set record)
            baseline=TRAINING.baseline_validation(),
        log:
            f"{WORK}/logs/train/models_record.log",
        conda:
            "../envs/learn.yaml"
        script:
            "../scripts/model_record.py"


    rule train:
        input:
            file(COHORT, "splits", OUT),
            file(MODELS, "record", _MODELS),
