# The digital phantom: generated when config bids_dir is null (the default).

if PLAN.phantom:

    rule phantom:
        output:
            description=f"{PLAN.bids_dir}/dataset_description.json",
            participants=f"{PLAN.bids_dir}/participants.tsv",
            files=[f for s in PLAN.subjects.values() for f in (*s.files.values(), s.sidecar)],
            # ground truth that the evaluation reads (mrflesion.layout: truth)
            truth=EVAL.all_truth_files(),
            # the pairs' true and manual new/enlarged masks (longitudinal phantom)
            longitudinal=LONG.phantom_files(),
        params:
            out=lambda wc, output: os.path.dirname(output.description),
            cfg=config["phantom"],
            inversion=config.get("sequence_model", {}).get("inversion_efficiency", "perfect"),
        threads: 2
        log:
            f"{WORK}/logs/phantom.log",
        conda:
            "../envs/phantom.yaml"
        script:
            "../scripts/phantom.py"
