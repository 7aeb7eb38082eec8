"""Launching on clusters: ``python -m dinov2_hier.run.submit`` (SLURM through submitit, with
checkpoint-and-requeue on preemption and near the time limit; :mod:`.submit`) and the
signal-to-stop-flag plumbing the training CLI and the submitted job share (:mod:`.signals`).
See docs/slurm.md; the plain ``sbatch`` scripts live in ``slurm/``."""
