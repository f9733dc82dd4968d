"""Stage 6, the runtime: what turns the stages into a run — the DataModule (images -> backbone ->
store -> graphs), the callbacks (checkpoints, export, progress, monitors), the checks of a run's
settings, the output folder, the strategy of several processes and the export of eigvecs.pt and
figures. Only this package, the solvers and the entry modules (``ldsc.run``, ``ldsc.extend``,
``ldsc.evaluate``, ``ldsc.bench``) import Lightning or Hydra."""
