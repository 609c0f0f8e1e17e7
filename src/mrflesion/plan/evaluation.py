"""The plan of inference and evaluation (rules/evaluate.smk, rules/group.smk): per subject, the
networks' output files, the images they read, the references and truth the evaluation compares them
with. Every network's outputs are named ``desc-<network label>`` (:func:`net_label`: the network
name without non-alphanumerics, e.g. ``MSE-2-1`` -> ``MSE21``)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from ..evaluate.lesion_quant import QUANT_UNITS
from ..layout import COHORT, MODELS, WORK, derivative, derivatives, file
from ..learn.spec import PRIOR_NAMES
from .training import TRAIN_IMAGES, needed_images, ready_file

#: Conventional-chain rules whose Snakemake benchmark files give the per-subject timings.
CHAIN_STEPS = ("check_inputs", "qmri", "register", "tissue")


def net_label(name: str) -> str:
    """BIDS-safe ``desc`` label of a network name (alphanumerics only)."""
    label = re.sub(r"[^A-Za-z0-9]", "", name)
    if not label:
        raise ValueError(f"network name {name!r} has no letters or digits")
    return label


def output_files(out_dir: str, stem: str, network: str, outputs: Sequence[str]) -> dict[str, str]:
    return derivatives("network", out_dir, stem, keys=outputs, label=net_label(network))


def check_labels(networks: Sequence[str]) -> None:
    labels = [net_label(n) for n in networks]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ValueError(f"mrflesion: network names map to the same file label(s) {dup}; rename them")


class EvaluationPlan:
    """Parse-time view of inference and evaluation for rules/evaluate.smk."""

    def __init__(self, plan: Any, training: Any, config: Mapping[str, Any], out_dir: str, work_dir: str) -> None:
        self.plan = plan
        self.training = training
        self.out = out_dir
        self.work = work_dir
        self.cfg = config["evaluation"]
        self.networks: dict[str, list[str]] = {n: list(s["outputs"]) for n, s in training.networks.items()}
        check_labels(list(self.networks))
        #: apply mode: the models directory's networks (mrflesion.model_card.ApplyPlan); else None
        self.models = getattr(training, "models", None)
        self.models_dir = self.models.dir if self.models is not None else file(COHORT, "models", out_dir)
        self.refused: dict[str, str] = dict(getattr(training, "refused", {}))
        #: the subjects that get inference and evaluation (apply mode: not those refused)
        self.stems = [st for st in plan.stems() if st not in self.refused]
        needed = {k for n in self.networks for k in needed_images(training.networks[n])} | {"mask"}
        self.image_kinds = [k for k in ("mrf", "T1", "T2star", *PRIOR_NAMES, "mask") if k in needed]
        self.truth_dir = f"{plan.bids_dir}/derivatives/truth" if plan.phantom else None

    def truth_files(self, stem: str) -> dict[str, str]:
        if not self.truth_dir:
            return {}
        return derivatives("truth", self.truth_dir, stem)

    def truth_table(self, stem: str) -> str | None:
        return derivative("truth_table", "lesionid", self.truth_dir, stem) if self.truth_dir else None

    def all_truth_files(self) -> list[str]:
        return [f for st in self.plan.stems() for f in [*self.truth_files(st).values(), self.truth_table(st)] if f]

    def summary_splits(self) -> list[str]:
        """The splits the group tables summarise (apply mode: every subject, split ``apply``)."""
        from ..model_card import APPLY_SPLIT

        return [APPLY_SPLIT] if self.models is not None else list(self.cfg["summary_splits"])

    def refused_rows(self) -> list[dict[str, str]]:
        """Subjects whose inference is refused (apply mode), as rows of ``group/failed.tsv``."""
        return [{"subject": self.plan.subjects[st].key, "status": "refused", "reason": line}
                for st, line in self.refused.items()]

    def ready(self, stem: str) -> str:
        """The file that stands for a subject's finished conventional chain (see
        :data:`mrflesion.plan.training.READY_IMAGE`)."""
        return ready_file(self.out, stem)

    def models_record(self) -> str:
        return file(MODELS, "record", self.models_dir)

    def network_outputs(self, stem: str) -> dict[str, str]:
        """Every network's output files of one subject, named ``<label>_<output>``."""
        return {f"{net_label(n)}_{o}": f for n in self.networks for o, f in self.outputs(n, stem).items()}

    def outputs(self, network: str, stem: str) -> dict[str, str]:
        return output_files(self.out, stem, network, self.networks[network])

    def benchmark(self, step: str, stem: str) -> str:
        return file(WORK, "benchmark", self.work, step=step, stem=stem)

    def evaluate_inputs(self, stem: str) -> dict[str, str]:
        """Declared inputs of a subject's evaluation: ``models`` (the record ``models/models.json`` of
        every trained network, written after the weights; depending on it rather than on the training
        jobs' outputs keeps planning linear in the cohort size), ``ready`` (the finished chain: the
        images the networks read, the references and the registered MRF series) and the phantom
        truth; the paths it reads are in :meth:`evaluate_params`. Few declared inputs per subject keep
        planning a large cohort fast."""
        d = {"models": self.models_record(), "ready": self.ready(stem)}
        for k, f in self.truth_files(stem).items():
            d[f"truth_{k}"] = f
        return d

    def evaluate_files(self, stem: str) -> dict[str, str]:
        """The images an evaluation reads, named ``ref_<map>``, ``mask``, ``mrf_t2w``, ``flair_t2w``,
        ``raw_<kind>`` (``ref_lesion``: only for a subject with a manual mask)."""
        s = self.plan.subjects[stem]
        # the manual mask's T2w-space copy only where the subject has one (apply mode may lack it: no
        # lesion metric against the pipeline's reference, no manual lesions in the per-lesion table)
        d = {f"ref_{k}": f"{self.out}/" + v.format(stem=stem) for k, v in TRAIN_IMAGES.items()
             if k not in ("mask", "mrf") and (k != "lesion" or s.annotated)}
        d["mask"] = f"{self.out}/" + TRAIN_IMAGES["mask"].format(stem=stem)
        d["mrf_t2w"] = f"{self.out}/" + TRAIN_IMAGES["mrf"].format(stem=stem)
        d["flair_t2w"] = derivative("register", "flair", self.out, stem)
        d["baseline"] = derivative("tissue", "baseline", self.out, stem)
        d.update({f"quant_{k}": derivative("register", k, self.out, stem) for k in QUANT_UNITS})
        d["csf"] = derivative("tissue", "CSF", self.out, stem)
        d.update(raw_mrf=s.files["mrf"], raw_t2w=s.files["t2w"], raw_flair=s.files["flair"])
        return d

    def network_images(self, stem: str) -> dict[str, str]:
        """The T2w-space images (``mrf``, ``T1``, ``T2star``, the tissue priors, ``mask``) the networks read."""
        return {k: f"{self.out}/" + TRAIN_IMAGES[k].format(stem=stem) for k in self.image_kinds}

    def evaluate_params(self, stem: str) -> dict[str, Any]:
        """Everything the evaluation of one subject needs besides its files (one params callable)."""
        s = self.plan.subjects[stem]
        return {
            "images": self.network_images(stem),
            "key": s.key, "session": s.session, "site": s.site, "group": s.group or "n/a",
            "split": self.training.split_of.get(f"sub-{s.subject}", "n/a"),
            "networks": self.networks, "truth": self.truth_files(stem), "files": self.evaluate_files(stem),
            "truth_table": self.truth_table(stem),
            "benchmarks": {step: self.benchmark(step, stem) for step in CHAIN_STEPS},
            "lead": next(iter(self.networks), None),
            "weights": {n: file(MODELS, "best", self.models_dir, network=n) for n in self.networks},
            "histories": {n: file(MODELS, "history", self.models_dir, network=n) for n in self.networks},
            "cards": {n: file(MODELS, "card", self.models_dir, network=n) for n in self.networks},
            "schedule": self.plan.schedule[stem], "sidecar": s.sidecar,
        }

    def subject_outputs(self, stem: str) -> dict[str, str]:
        return derivatives("evaluation", self.out, stem)
