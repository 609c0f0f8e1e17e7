# Network training (cohort step): subject-level splits, then one job per entry of `networks:`.
#
#   snakemake --cores 2 train                                 # every listed network (demo settings)
#   snakemake --cores 2 results/mrflesion/models/MSE-5/best.pt
#   snakemake --profile profiles/slurm --configfile config.yaml config/paper.yaml -- train   # paper
#
# The split is computed here, at parse time, so that a training job depends on its training and
# validation subjects only (test subjects never reach training or model selection); see
# mrflesion.learn_steps. Resumable state: {WORK}/train/<network>/ (delete it to retrain from scratch).
import re

from mrflesion.learn_steps import TrainingPlan, splits_hash

TRAINING = TrainingPlan(PLAN, config, OUT)


wildcard_constraints:
    network="|".join(re.escape(n) for n in TRAINING.networks) or "$^",


rule splits:
    output:
        f"{OUT}/group/splits.tsv",
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


rule train_network:
    input:
        unpack(lambda wc: TRAINING.inputs(wc.network)),
    output:
        best=f"{OUT}/models/{{network}}/best.pt",
        history=f"{OUT}/models/{{network}}/history.tsv",
        sidecar=f"{OUT}/models/{{network}}/best.json",
    params:
        spec=lambda wc: TRAINING.networks[wc.network],
        cfg=TRAINING.train_cfg,
        train_subjects=lambda wc: TRAINING.subjects(wc.network, "train"),
        val_subjects=lambda wc: TRAINING.subjects(wc.network, "val"),
        state_dir=lambda wc: f"{WORK}/train/{wc.network}",
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


localrules:
    model_record,


rule model_record:
    input:
        best=f"{OUT}/models/{{network}}/best.pt",
        history=f"{OUT}/models/{{network}}/history.tsv",
        sidecar=f"{OUT}/models/{{network}}/best.json",
    output:
        f"{OUT}/models/{{network}}/model.json",
    log:
        f"{WORK}/logs/train/{{network}}_record.log",
    conda:
        "../envs/learn.yaml"
    script:
        "../scripts/model_record.py"


rule train:
    input:
        f"{OUT}/group/splits.tsv",
        expand(f"{OUT}/models/{{network}}/model.json", network=list(TRAINING.networks)),
