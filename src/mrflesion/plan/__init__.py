"""Parse-time planning: what the Snakefile and rules/*.smk need to build the job graph.

=========================  ==========================================================================
module                     what it plans
=========================  ==========================================================================
``plan.subjects``          the cohort: subjects and sessions, their input files, MRF schedules,
                           subjects skipped after a failed input check (:func:`make_plan`)
``plan.training``          the subject split per site and every training job's inputs
                           (:class:`TrainingPlan`); the images the networks read
``plan.evaluation``        inference and evaluation per subject (:class:`EvaluationPlan`), the
                           networks' output files
=========================  ==========================================================================

Nothing here reads an image or writes a file (except the phantom's plan, which is computed from its
parameters): file names come from :mod:`mrflesion.layout`, the rule bodies are in
:mod:`mrflesion.steps`, apply mode's models directory is read by :mod:`mrflesion.model_card`.
"""
