"""napari-dmoe's training package: dMoE networks, data, losses, fairness metrics and CLIs.

Public API (import from the submodules; nothing heavy is imported here):

- ``training.networks``: ``DMoE`` (the layer), ``MoESpec`` (what every MoE layer of a
  network is made of), ``create_model`` / ``list_models`` (TransUNet, ResUNet, separate
  per-group models), ``SegmentationOutput``, ``LayerRouting``, ``UNKNOWN_ATTRIBUTE``.
- ``training.data``: ``load_cases``, ``validate_cases``, ``assign_splits``, ``read_image``,
  ``write_label``, ``Preprocessing``, ``SegmentationDataset``, ``make_synthetic_dataset``;
  ``training.data.geometry`` (canonical orientation, spacing, exact mapping back);
  ``training.data.dicom`` (``find_series``, ``read_series``, ``write_dicom_seg``,
  ``write_rtstruct``).
- ``training.losses``: ``build_loss`` (``dicece``, ``febs``, ``groupdro``, ``adv``);
  ``training.adversarial`` (the gradient-reversal discriminator).
- ``training.fitting``: ``FitConfig``, ``fit`` (the engine), ``prepare_data``,
  ``build_model``; ``training.run_folder`` (the output-folder lock ``lock_folder`` /
  ``lock_outputs`` held by ``fit``, ``predict``, ``evaluate`` and ``routing`` while they
  write, overwrite refusal, temp-file clean-up; the refusal of
  ``predict``/``evaluate``/``routing`` to replace an earlier run's outputs without
  ``--overwrite``).
- ``training.metrics``: ``case_scores``, ``equity_scaled``, ``fairness_summary``,
  ``RunningFairness``; ``training.report``: metrics.json / report.md / violin / compare.
- ``training.checkpoint``: ``save_checkpoint``, ``load_checkpoint`` (safetensors, no pickle);
  ``atomic_write_bytes``, ``atomic_write_text``, ``atomic_savefig`` (temporary file + rename;
  checkpoints, label files, reports and figures are written through them).
- ``training.inference``: ``Segmenter`` (the one inference entry point), ``RoutingMap``,
  ``expert_usage``, ``Cancelled``, ``available_devices``.
- ``training.stats``: paired bootstrap confidence intervals.
- CLIs (``python -m training.<name>``): ``fit``, ``evaluate``, ``predict``, ``benchmark``,
  ``routing``, ``profile``, ``synth``.

Nothing here imports napari or Qt; the plugin (``napari_dmoe``) is a thin UI over this API.
"""

__version__ = "0.1.0"
